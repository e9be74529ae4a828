"""`capfilt serve`: the REST service on uvicorn, its models in Ray actors.

capfilt/cli.py wires it in with `add_serve_parser(sub)` and calls `run_serve(args)`;
`python -m capfilt.services.serve_cli ...` runs it on its own.

The API key never goes on the command line (where `ps` shows it): it comes from the environment
variable CAPFILT_API_KEY or from the file --api-key-file names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capfilt.errors import CapfiltError, signals_interrupt

from .config import MiB, ServeConfig

log = logging.getLogger(__name__)

API_KEY_ENV = "CAPFILT_API_KEY"


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` command to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "serve",
        help="the REST API: caption and score single pairs, submit and watch cleaning jobs",
        description=(
            "Serve /v1/caption, /v1/score, /v1/capfilt and /v1/jobs (FastAPI on uvicorn; OpenAPI at /docs). "
            "The captioner and filter run in Ray actors with dynamic micro-batching; jobs are `capfilt clean` "
            f"submitted through Ray Jobs. The API key comes from ${API_KEY_ENV} or --api-key-file."
        ),
    )
    p.add_argument("--captioner", required=True, metavar="CKPT", help="captioner checkpoint")
    p.add_argument("--filter", required=True, metavar="CKPT", help="filter checkpoint (ITM with [ENC])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: 8000)")
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster (default: RAY_ADDRESS, a running local Ray, else a new local one; 'local' forces new)",
    )
    p.add_argument(
        "--dashboard-port", type=int, default=8265, help="a new local Ray's dashboard port (default: 8265)"
    )
    p.add_argument(
        "--dashboard-url",
        default=None,
        metavar="URL",
        help="Ray dashboard for Ray Jobs and job links (default: the cluster's own)",
    )
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="actors per model (default: 1)")
    p.add_argument("--num-gpus", type=float, default=0, metavar="G", help="GPUs per actor (default: 0)")
    p.add_argument(
        "--num-cpus",
        type=float,
        default=0,
        help="CPUs each actor reserves in Ray (default: 0, leaving them to cleaning jobs)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor (default: 1)")
    p.add_argument(
        "--precision",
        choices=["exact", "fast"],
        default="exact",
        help="exact: fp32; fast: bf16 on GPUs (fp16 before Ampere) and CPUs with AMX, int8 on other CPUs (default: exact)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="requests per forward pass; 1 turns batching off (default: 16)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its forward pass (default: 5)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="requests waiting or running on each model replica; more get a 503 with Retry-After (default: 256)",
    )
    p.add_argument(
        "--api-key-file", default=None, metavar="FILE", help=f"file holding the API key (else ${API_KEY_ENV})"
    )
    p.add_argument(
        "--auth",
        choices=["jobs", "all"],
        default="jobs",
        help="what the API key guards: the job endpoints, or every /v1 endpoint and /metrics (default: jobs)",
    )
    p.add_argument(
        "--input-root",
        action="append",
        default=[],
        metavar="DIR",
        help="jobs may read inputs and checkpoints under it (repeatable; without roots jobs are disabled)",
    )
    p.add_argument(
        "--output-root",
        action="append",
        default=[],
        metavar="DIR",
        help="jobs may write under it (repeatable)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=16 * MiB, help="largest request body (default: 16 MiB)"
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=25_000_000,
        help="largest image, width x height, refused before decoding (default: 25000000)",
    )
    return p


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            key = path.read_text().strip()
        except OSError as err:
            raise CapfiltError(f"--api-key-file {path}: cannot read it ({err})") from err
        if not key:
            raise CapfiltError(f"--api-key-file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        captioner=args.captioner,
        filter=args.filter,
        host=args.host,
        port=args.port,
        ray_address=args.ray_address,
        dashboard_port=args.dashboard_port,
        dashboard_url=args.dashboard_url,
        replicas=args.replicas,
        num_gpus=args.num_gpus,
        num_cpus=args.num_cpus,
        threads=args.threads,
        precision=args.precision,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        api_key=_api_key(args),
        auth=args.auth,
        input_roots=tuple(Path(r).resolve() for r in args.input_root),
        output_roots=tuple(Path(r).resolve() for r in args.output_root),
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels,
    )


def init_ray(config: ServeConfig) -> str | None:
    """Connect to (or start) Ray with a dashboard on 127.0.0.1; returns the dashboard URL, if any."""

    from capfilt.pipelines.ray_connect import connect_ray

    context = connect_ray(
        config.ray_address,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=config.dashboard_port,
        log_to_driver=False,
    )
    url = config.dashboard_url or getattr(context, "dashboard_url", None)
    if url and "://" not in url:
        url = f"http://{url}"
    return url or None


def run_serve(args: argparse.Namespace) -> int:
    """Validate, start Ray and the actors, serve until interrupted. Prints one JSON line once listening:
    {"url", "dashboard", "ray_address"}."""
    import ray

    from .actors import ModelPool
    from .app import create_app
    from .jobs import JobManager

    config = config_from_args(args)
    config.validate()
    if config.api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can submit jobs", config.host)
    _check_port(config.host, config.port)  # before Ray and the models start, not 30 s later
    dashboard = init_ray(config)
    _warn_unplaceable(config)
    models = ModelPool.start(config)
    jobs = JobManager(config, dashboard) if dashboard else None
    if jobs is None:
        log.warning("the Ray cluster has no dashboard: the job endpoints cannot reach Ray Jobs")
    own_cluster = _started_ray_here()
    if own_cluster and jobs is not None and config.jobs_enabled:
        log.warning(
            "jobs run on the Ray cluster this service started: they stop when the service stops, and a "
            "restarted service does not list them. For jobs that outlive the service, start Ray with "
            "`ray start --head` and pass its address with --ray-address."
        )
    app = create_app(config, models, jobs)
    try:
        facts = {"dashboard": dashboard, "ray_address": ray.get_runtime_context().gcs_address}
        # uvicorn hands a SIGTERM on to the handler it found once it has shut down: Ray's
        # exited with a traceback (SystemExit 15); as an interrupt, the service stops cleanly.
        with signals_interrupt():
            asyncio.run(_serve(app, config, models, facts))
    except KeyboardInterrupt:
        pass
    finally:
        if own_cluster and jobs is not None and config.jobs_enabled:
            _say_which_jobs_stop(jobs)
        models.shutdown()
        ray.shutdown()
    return 0


def _started_ray_here() -> bool:
    """Whether this process started its Ray cluster (which then ends with it), not joined one."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # the head's Node when started here
    return bool(getattr(node, "head", False))


def _say_which_jobs_stop(jobs: Any) -> None:
    """The unfinished jobs that stop with the service's own Ray, and how to finish them. A stop
    sent to the whole process group (systemd, `timeout`, Ctrl-C in a terminal) has taken Ray's
    dashboard down already: then the jobs this service submitted are named, as maybe unfinished."""
    try:
        unfinished = jobs.unfinished_outputs()
    except Exception as err:  # stopping anyway: name what this service knows
        log.warning("could not list the jobs that stop with this service (%s)", err)
        unfinished = {job_id: ("state unknown", out) for job_id, out in jobs.submitted_here.items()}
    for job_id, (state, output) in sorted(unfinished.items()):
        log.warning(
            "job %s (%s) stops with this service's Ray unless it had ended; submit it again with "
            '"resume": true and output %s to finish it',
            job_id,
            state,
            output,
        )


async def _serve(app: Any, config: ServeConfig, models: Any, facts: dict[str, Any]) -> None:
    """uvicorn until interrupted; the bound URL printed once it listens. A model actor that fails to
    load (a wrong checkpoint) ends the service with its error instead of a /readyz that stays 503."""
    import uvicorn

    from .actors import ModelUnavailable

    _raise_open_files_limit()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="asyncio",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    task = asyncio.create_task(_listen(server, config))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(json.dumps({"url": f"http://{shown}:{port}", **facts}), flush=True)
    failure: ModelUnavailable | None = None
    started, next_note = time.monotonic(), LOADING_NOTE_S
    while not task.done():
        try:
            if models.ready():
                break
            if time.monotonic() - started > next_note:
                log.warning(
                    "the models are still loading after %.0f s (/readyz answers 503): Ray may be "
                    "waiting for resources the model actors need (%s); see `ray status`",
                    next_note,
                    _actor_needs(config),
                )
                next_note *= 2
        except ModelUnavailable as err:
            log.error("stopping: %s", err)
            failure = err
            server.should_exit = True
            break
        await asyncio.sleep(0.2)
    await task
    if failure is not None:
        raise CapfiltError(f"the service stopped: {failure}")


LOADING_NOTE_S = 60.0  # a service not ready after this long says so (then after twice as long...)


async def _listen(server: Any, config: ServeConfig) -> None:
    """uvicorn's serve(); a failure to listen (uvicorn exits the process on one) as a CapfiltError."""
    try:
        await server.serve()
    except KeyboardInterrupt:  # the SIGTERM or Ctrl-C uvicorn handed on once it had shut down
        return
    except SystemExit as err:
        if server.started:
            raise
        raise CapfiltError(
            f"--host {config.host} --port {config.port}: could not listen there (uvicorn's exit code {err.code}; "
            "its log above says why): pick another --port, or stop what listens there"
        ) from None


def _check_port(host: str, port: int) -> None:
    """CapfiltError when `host`:`port` cannot be listened on (taken, or not this machine's address).
    uvicorn binds with SO_REUSEADDR, and so does this check. Port 0 (any free one) always works."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:
        raise CapfiltError(f"--host {host}: cannot resolve it ({err})") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise CapfiltError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err}): pick another "
                "--port (0: any free one), or stop what listens there"
            ) from err


def _actor_needs(config: ServeConfig) -> str:
    each = f"{config.num_cpus:g} CPU" + (f" and {config.num_gpus:g} GPU" if config.num_gpus else "")
    return f"{2 * config.replicas} actors of {each} each"


def _warn_unplaceable(config: ServeConfig) -> None:
    """Warn when the cluster, as it is now, cannot hold the model actors: they wait for the
    autoscaler, and the service stays unready until it adds what they need."""
    from capfilt.pipelines.clean_resources import cluster_nodes

    nodes = cluster_nodes()
    if config.num_gpus:
        fits = sum(math.floor(n.gpus / config.num_gpus + 1e-9) for n in nodes)
        have = f"{sum(n.gpus for n in nodes):g} GPUs"
    elif config.num_cpus:
        fits = sum(math.floor(n.cpus / config.num_cpus + 1e-9) for n in nodes)
        have = f"{sum(n.cpus for n in nodes):g} CPUs"
    else:
        return
    if fits < 2 * config.replicas:
        log.warning(
            "%s need more than the Ray cluster has now (%s): the service stays unready (/readyz 503) "
            "until the autoscaler adds it; with none coming, lower --replicas, --num-gpus or --num-cpus",
            _actor_needs(config),
            have,
        )


def _raise_open_files_limit() -> None:
    """Each connection holds a file descriptor, and a common soft limit is 1,024: a thousand idle
    half-sent requests stopped the service accepting any. Raise it to the hard limit (uvicorn has no
    timeout on a request's headers or body: docs/service.md puts the service behind a proxy that does)."""
    try:
        import resource
    except ImportError:  # not on Linux or macOS
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard)
            )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m capfilt.services.serve_cli ARGS`: the `serve` command on its own."""
    from capfilt.cli import main as capfilt_main  # one entry point: same logging, errors, exit codes

    return capfilt_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
