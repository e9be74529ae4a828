"""`capfilt bench serve`: the command line of `services.bench`.

capfilt/cli.py adds a `bench` command whose subparsers get `add_bench_serve_parser(bench_sub)`,
and calls `run_bench_serve(args)` for `capfilt bench serve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from capfilt.errors import CapfiltError


def add_bench_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to the subparsers of the `bench` command; returns its parser."""
    p = subparsers.add_parser(
        "serve",
        help="load-test the REST service on loopback: throughput, p50/p99, with and without micro-batching",
        description=(
            "Start the service on 127.0.0.1 twice (micro-batching on, then --max-batch 1) with the given or "
            "random checkpoints, drive it with concurrent HTTP clients for a fixed time, and print requests/s, "
            "p50/p99 latency and requests per forward pass for each, and the speed-up."
        ),
    )
    p.add_argument("--captioner", default=None, metavar="CKPT", help="default: random weights of --size")
    p.add_argument("--filter", default=None, metavar="CKPT", help="default: random weights of --size")
    p.add_argument("--size", default="small", help="model size of random checkpoints (default: small)")
    p.add_argument(
        "--endpoint",
        choices=["caption", "score", "capfilt"],
        default="caption",
        help="what to load (default: caption)",
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per mode (default: 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per mode first (default: 2)")
    p.add_argument(
        "--max-batch", type=int, default=16, help="requests per forward pass when batching (default: 16)"
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching window (default: 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor (default: 1)")
    p.add_argument(
        "--image-size", type=int, default=256, help="side of the JPEG each request sends (default: 256)"
    )
    p.add_argument(
        "--ray-address", default="local", help="Ray to run the actors on (default: a new local one)"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def run_bench_serve(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from .bench import BenchConfig, bench_serve

    if args.clients < 1 or args.max_batch < 2:
        raise CapfiltError("--clients must be >= 1 and --max-batch >= 2 (the other mode runs with 1)")
    if not (0 < args.duration <= 600 and 0 <= args.warmup <= 60):
        raise CapfiltError("--duration must be in (0, 600] seconds and --warmup in [0, 60]")
    if (args.captioner is None) != (args.filter is None):
        raise CapfiltError("give both --captioner and --filter, or neither (random weights of --size)")
    config = BenchConfig(
        captioner=args.captioner,
        filter=args.filter,
        size=args.size,
        endpoint=args.endpoint,
        clients=args.clients,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        threads=args.threads,
        image_size=args.image_size,
        ray_address=args.ray_address,
    )
    console = Console(stderr=True)
    console.print(
        f"benchmarking POST /v1/{args.endpoint} with {args.clients} clients, {args.duration:g} s per mode"
    )
    result = bench_serve(config)
    if args.json:
        print(
            json.dumps(
                {
                    "config": dataclasses.asdict(result["config"]),
                    "modes": [dataclasses.asdict(m) for m in result["modes"]],
                    "speedup": round(result["speedup"], 3),
                }
            )
        )
        return 0
    table = Table(
        title=f"POST /v1/{args.endpoint}, {args.clients} concurrent clients, {args.duration:g} s",
        box=box.SIMPLE,
    )
    columns = (
        "mode",
        "max batch",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p99 ms",
        "req/pass",
        "model busy",
    )
    for column in columns:
        table.add_column(column, justify="right" if column != "mode" else "left")
    for m in result["modes"]:
        table.add_row(
            m.mode,
            str(m.max_batch),
            str(m.requests),
            str(m.errors),
            f"{m.throughput:.1f}",
            f"{m.p50_ms:.1f}",
            f"{m.p99_ms:.1f}",
            f"{m.mean_batch:.2f}",
            f"{m.forward_busy:.0%}",
        )
    out = Console(width=max(Console().width, 100))
    out.print(table)
    out.print(f"micro-batching gives {result['speedup']:.2f}x the throughput")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m capfilt.services.bench_cli ARGS`: `capfilt bench serve` on its own."""
    from capfilt.cli import main as capfilt_main  # one entry point: same logging, errors, exit codes

    return capfilt_main(["bench", "serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
