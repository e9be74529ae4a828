"""The service's load benchmark: throughput and latency with and without micro-batching.

    result = bench_serve(BenchConfig(clients=16, duration_s=10))

For each mode (micro-batching at `max_batch`, then off: `max_batch=1`) the service is started on
127.0.0.1 (a free port, uvicorn in a thread of this process, fresh model actors on a local Ray),
`clients` concurrent HTTP clients send the same kind of request back to back for `warmup_s` (not
counted) and then `duration_s`, and the run reports requests/s, p50/p99 latency and the mean number
of requests per forward pass the actors saw. Every loop is bounded in time; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from capfilt.errors import CapfiltError

from .config import ServeConfig

log = logging.getLogger(__name__)

ENDPOINTS = ("caption", "score", "capfilt")
CORPUS = [
    "a red circle on a blue background",
    "two green squares next to a yellow triangle",
    "three big purple stars in the corner",
    "an orange ring above a white square",
    "a black cat sleeping on a grey sofa",
    "two dogs running on the beach at sunset",
]


@dataclass
class BenchConfig:
    captioner: str | None = None  # None: a random checkpoint of `size` (the speed is what counts)
    filter: str | None = None
    size: str = "small"  # model size of the random checkpoints
    endpoint: str = "caption"
    clients: int = 16
    duration_s: float = 10.0  # measured time per mode
    warmup_s: float = 2.0  # per mode, not counted
    max_batch: int = 16  # the batched mode's; the other mode runs with 1
    max_wait_ms: float = 5.0
    threads: int = 1  # torch threads per actor
    image_size: int = 256  # side of the request's JPEG
    ray_address: str | None = "local"


@dataclass
class ModeResult:
    mode: str
    max_batch: int
    requests: int
    errors: int
    seconds: float
    throughput: float  # requests per second
    p50_ms: float
    p99_ms: float
    mean_batch: float  # requests per forward pass, as the actors counted them
    forward_busy: float  # share of the run the model actors spent in forward passes (summed over actors)
    status: dict[int, int] = field(default_factory=dict)


def random_checkpoints(out: Path, size: str) -> tuple[str, str]:
    """A captioner and a filter of `size` with random weights and a small vocabulary."""
    from capfilt.model.checkpoint import new_checkpoint, save_checkpoint
    from capfilt.model.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(CORPUS * 5, vocab_size=200)
    paths = []
    for role in ("captioner", "filter"):
        ckpt = new_checkpoint(size, tokenizer, role=role, provenance={"created_for": "capfilt bench serve"})
        paths.append(str(save_checkpoint(ckpt, out / role)))
    return paths[0], paths[1]


def request_body(endpoint: str, image_size: int, index: int) -> dict[str, Any]:
    """A JSON body for `endpoint` with a JPEG of `image_size` pixels a side."""
    rng = np.random.default_rng(index)
    pixels = (rng.random((image_size, image_size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    image = base64.b64encode(buf.getvalue()).decode()
    if endpoint == "caption":
        return {"image": image, "seed": index}
    if endpoint == "score":
        return {"image": image, "texts": CORPUS[:3]}
    return {"image": image, "text": CORPUS[index % len(CORPUS)], "key": f"{index:09d}", "seed": 0}


class LoopbackServer:
    """uvicorn in a background thread on 127.0.0.1, any free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=0, loop="asyncio", log_level="warning", access_log=False
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


async def _load(
    url: str, path: str, bodies: list[bytes], clients: int, warmup_s: float, duration_s: float
) -> tuple[list[float], dict[int, int]]:
    """`clients` workers posting back to back; latencies (s) and statuses of the requests that start
    and end within the measured window. aiohttp (C-accelerated) keeps the load generator's own CPU
    cost small: on a small machine it shares the cores with the service it measures."""
    import aiohttp

    latencies: list[float] = []
    status: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    headers = {"Content-Type": "application/json"}

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        n = i
        while loop.time() < stop_at:
            t0 = loop.time()
            async with session.post(url + path, data=bodies[n % len(bodies)], headers=headers) as response:
                await response.read()
            t1 = loop.time()
            n += clients
            if t0 >= measure_from and t1 <= stop_at:
                latencies.append(t1 - t0)
                status[response.status] = status.get(response.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(i, session) for i in range(clients)))
    return latencies, status


def _run_mode(config: ServeConfig, bench: BenchConfig, mode: str, bodies: list[bytes]) -> ModeResult:
    from .actors import ModelPool
    from .app import create_app

    models = ModelPool.start(config)
    try:
        models.wait_ready(300)
        before = models.stats()
        with LoopbackServer(create_app(config, models, None)) as url:
            latencies, status = asyncio.run(
                _load(url, f"/v1/{bench.endpoint}", bodies, bench.clients, bench.warmup_s, bench.duration_s)
            )
        after = models.stats()
    finally:
        models.shutdown()
    passes = requests = 0
    busy = 0.0
    for role, stats in after.items():
        old = before.get(role)
        busy += stats.seconds - (old.seconds if old else 0.0)
        for size, n in stats.sizes.items():
            n -= old.sizes.get(size, 0) if old else 0
            passes += n
            requests += n * size
    ok = status.get(200, 0)
    lat_ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return ModeResult(
        mode=mode,
        max_batch=config.max_batch,
        requests=ok,
        errors=len(latencies) - ok,
        seconds=bench.duration_s,
        throughput=ok / bench.duration_s,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p99_ms=float(np.percentile(lat_ms, 99)),
        mean_batch=requests / passes if passes else 0.0,
        forward_busy=busy / (bench.warmup_s + bench.duration_s),
        status=status,
    )


def bench_serve(bench: BenchConfig) -> dict[str, Any]:
    """Run both modes; returns {"config", "modes": [ModeResult...], "speedup"}."""
    import ray

    from capfilt.model.config import SIZES

    if bench.endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {bench.endpoint!r}")
    if (bench.captioner is None or bench.filter is None) and bench.size not in SIZES:
        raise CapfiltError(f"--size must be one of {', '.join(SIZES)}; got {bench.size!r}")
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as tmp:
        captioner, filt = bench.captioner, bench.filter
        if captioner is None or filt is None:
            made = random_checkpoints(Path(tmp), bench.size)
            captioner, filt = captioner or made[0], filt or made[1]
        config = ServeConfig(
            captioner=captioner,
            filter=filt,
            port=0,
            threads=bench.threads,
            max_batch=bench.max_batch,
            max_wait_ms=bench.max_wait_ms,
            max_image_pixels=max(bench.image_size**2, 1),
        )
        config.validate()
        bodies = [json.dumps(request_body(bench.endpoint, bench.image_size, i)).encode() for i in range(64)]
        started = not ray.is_initialized()
        if started:
            ray.init(address=bench.ray_address, include_dashboard=False, log_to_driver=False)
        try:
            modes = [
                _run_mode(config, bench, "micro-batching", bodies),
                _run_mode(replace(config, max_batch=1), bench, "no batching", bodies),
            ]
        finally:
            if started:
                ray.shutdown()
    speedup = modes[0].throughput / modes[1].throughput if modes[1].throughput else float("inf")
    return {"config": bench, "modes": modes, "speedup": speedup}
