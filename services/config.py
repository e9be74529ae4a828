"""ServeConfig: every option of `capfilt serve` in one object, validated before anything starts."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from capfilt.errors import CapfiltError
from capfilt.pipelines.clean_resources import gpu_share_problem

Auth = Literal["jobs", "all"]
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """How the service runs. `validate` checks every option, the checkpoints' roles included."""

    captioner: str  # checkpoint the caption and capfilt endpoints use (and jobs by default)
    filter: str  # checkpoint the score and capfilt endpoints use (and jobs by default)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the bound URL is printed)
    ray_address: str | None = None  # None: RAY_ADDRESS, a running local Ray, else a new local one
    dashboard_port: int = 8265  # a new local Ray's dashboard (Ray Jobs needs it)
    dashboard_url: str | None = None  # where Ray Jobs is reached and linked; None: the cluster's own
    replicas: int = 1  # actors per model; a request goes to the least busy one
    num_gpus: float = 0.0  # GPUs per actor (fractions share a GPU)
    num_cpus: float = 0.0  # CPUs each actor reserves: 0 leaves every CPU to cleaning jobs on a small Ray
    threads: int = 1  # torch threads per actor
    # "fast": bf16 on GPUs (fp16 before Ampere) and AMX CPUs, int8 on other CPUs (capfilt clean --precision)
    precision: str = "exact"
    max_batch: int = 16  # requests per forward pass; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    # requests waiting or running on each model replica; more are refused with a 503 and Retry-After
    max_queue: int = 256
    api_key: str | None = field(default=None, repr=False)  # bearer key; None: no key is asked
    auth: Auth = "jobs"  # what the key guards: the job endpoints, or every /v1 endpoint and /metrics
    input_roots: tuple[Path, ...] = ()  # job inputs and checkpoints must resolve under one of these
    output_roots: tuple[Path, ...] = ()  # job outputs must resolve under one of these
    max_body_bytes: int = 16 * MiB
    max_image_pixels: int = 25_000_000  # width x height; larger images are refused before decoding
    job_python: str = sys.executable  # the interpreter Ray Jobs runs `capfilt clean` with

    def validate(self) -> None:
        """Raise CapfiltError naming the first bad option; last, the checkpoints are loaded once, as
        `capfilt clean` does, so a wrong path or role fails before Ray starts, naming the flag."""

        def bad(option: str, why: str) -> CapfiltError:
            return CapfiltError(f"--{option} {why}")

        for option, path in (("captioner", self.captioner), ("filter", self.filter)):
            if not Path(path).exists():
                raise bad(option, f"{path}: checkpoint not found")
        if not 0 <= self.port <= 65535:
            raise bad("port", f"must be in 0-65535; got {self.port}")
        if not 1 <= self.dashboard_port <= 65535:
            raise bad("dashboard-port", f"must be in 1-65535; got {self.dashboard_port}")
        if self.replicas < 1:
            raise bad("replicas", f"must be >= 1; got {self.replicas}")
        if problem := gpu_share_problem(self.num_gpus):
            raise bad("num-gpus", f"{problem}; got {self.num_gpus}")
        if not (self.num_cpus >= 0 and math.isfinite(self.num_cpus)):
            raise bad("num-cpus", f"must be >= 0; got {self.num_cpus}")
        if self.precision not in ("exact", "fast"):
            raise bad("precision", f"must be exact or fast; got {self.precision!r}")
        if self.threads < 1:
            raise bad("threads", f"must be >= 1; got {self.threads}")
        if self.max_batch < 1:
            raise bad("max-batch", f"must be >= 1 (1 turns batching off); got {self.max_batch}")
        if self.max_queue < 1:
            raise bad("max-queue", f"must be >= 1; got {self.max_queue}")
        if not (0 <= self.max_wait_ms <= 1000):
            raise bad("max-wait-ms", f"must be in [0, 1000]; got {self.max_wait_ms}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise CapfiltError("the API key is shorter than 16 characters; use a long random one")
        if self.auth not in ("jobs", "all"):
            raise bad("auth", f"must be 'jobs' or 'all'; got {self.auth!r}")
        if self.auth == "all" and self.api_key is None:
            raise bad("auth", "all needs an API key (CAPFILT_API_KEY or --api-key-file)")
        for option, roots in (("input-root", self.input_roots), ("output-root", self.output_roots)):
            for root in roots:
                if not root.is_absolute() or not root.is_dir():
                    raise bad(option, f"{root}: not an existing directory given by an absolute path")
        if self.max_body_bytes < 1024:
            raise bad("max-body-bytes", f"must be >= 1024; got {self.max_body_bytes}")
        if self.max_image_pixels < 1:
            raise bad("max-image-pixels", f"must be >= 1; got {self.max_image_pixels}")
        from capfilt.pipelines.clean import inspect_checkpoint  # torch: imported when a service starts

        inspect_checkpoint(self.captioner, "caption", "captioner")  # "--captioner PATH: ... is a filter ..."
        inspect_checkpoint(self.filter, "score", "filter")

    @property
    def jobs_enabled(self) -> bool:
        return bool(self.input_roots and self.output_roots)

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"
