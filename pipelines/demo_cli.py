"""`capfilt demo`: the command line of `pipelines.demo` (what `make demo` runs).

capfilt/cli.py wires it in with `add_demo_parser(sub)` and calls `run_demo_cli(args)`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="the whole product on this machine: built-in world, small checkpoints, a clean job on local Ray",
        description=(
            "Build the built-in web world, take the small captioner and filter shipped with CapFilt (or, "
            "with --train, train the demo's own, cached for next time), clean the web split on a local Ray with the dashboard up, and print what was kept and "
            "rejected, the filter's precision and recall against the world's truth, and where the "
            "outputs are."
        ),
    )
    p.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="where everything goes (default: runs/demo)"
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="checkpoint cache (default: $CAPFILT_CACHE, else ~/.cache/capfilt)",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="train the demo's own small captioner and filter (about 5 minutes on 2 cores, cached) instead "
        "of using the shipped ones, which took the bootstrap's 53 minutes and filter better",
    )
    p.add_argument(
        "--ship-from",
        default=None,
        metavar="RUN",
        help="maintainers: replace the shipped checkpoints with the first generation of a "
        "`capfilt bootstrap --out RUN` run (RUN/captioner, RUN/filter), then exit",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="ITM p(match) to keep a text (default: 0.5)")
    p.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return p


def run_demo_cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from capfilt.cli import stdout_to_stderr
    from capfilt.errors import CapfiltError

    from .demo import DemoConfig, run_demo, ship_checkpoints, shipped_root

    if args.ship_from:
        dest = shipped_root()
        manifest = ship_checkpoints(Path(args.ship_from), dest)
        print(
            f"shipped checkpoints written to {dest}: {len(manifest['files'])} files, digests in MANIFEST.json"
        )
        return 0
    if not 0.0 <= args.threshold <= 1.0:
        raise CapfiltError(f"--threshold must be a probability in [0, 1]; got {args.threshold}")
    console = Console(stderr=True)
    cfg = DemoConfig(
        out=args.out,
        cache=args.cache,
        threshold=args.threshold,
        dashboard=not args.no_dashboard,
        train=args.train,
    )
    with stdout_to_stderr():  # stdout is the result's
        result = run_demo(
            cfg, lambda message: console.print(f"[bold cyan]>[/bold cyan] {message}", highlight=False)
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_result(result, Console())
    return 0


def print_result(result: Any, console: Any) -> None:  # result: DemoResult
    from rich.table import Table

    c, q = result.clean, result.filter_quality
    reasons = Table(title="Web samples by decision", show_edge=False)
    reasons.add_column("reason")
    reasons.add_column("samples", justify="right")
    for reason, n in sorted(c["reasons"].items(), key=lambda kv: -kv[1]):
        reasons.add_row(reason, str(n))
    console.print(reasons)

    quality = Table(title="Filter against the world's truth (web texts)", show_edge=False)
    for column in ("noise type", "texts", "rejected", "rejection rate"):
        quality.add_column(column, justify="right" if column != "noise type" else "left")
    for row in q["by_type"]:
        quality.add_row(row["noise_type"], str(row["count"]), str(row["rejected"]), f"{row['rate']:.3f}")
    console.print(quality)
    ratio = lambda value: "n/a" if value is None else f"{value:.3f}"  # noqa: E731  (null: nothing to divide by)
    console.print(
        f"precision [bold]{ratio(q['precision'])}[/bold]  recall [bold]{ratio(q['recall'])}[/bold]  "
        f"F1 {ratio(q['f1'])}  (threshold {c['threshold']:.2f})"
    )
    out = c["output"]
    console.print(
        f"\n{c['samples']} web samples: {c['web_kept']} web texts and {c['synthetic_kept']} synthetic captions "
        f"kept; D' holds {c['dprime_pairs']} pairs with {c['human_pairs']} human ones."
    )
    console.print(
        f"clean job: {c['wall_s']:.1f} s, {c['samples_per_s']:.1f} pairs/s "
        f"(first results after {c['timings'].get('first_shard_s', float('nan')):.1f} s of start-up)"
    )
    console.print(f"stage seconds: {result.stage_seconds}")
    checkpoints = {
        "shipped": "shipped with CapFilt",
        "cache": "reused from the cache",
        "trained": "trained now, cached for next time",
    }[result.checkpoints_from]
    console.print(
        f"checkpoints ({checkpoints}): {result.checkpoints['captioner']}, {result.checkpoints['filter']}"
    )
    console.print(f"D' (webdataset shards): {out}/dprime   index: {out}/dprime_index")
    console.print(f"ledger (one row per sample): {out}/ledger   report: {out}/report.html")
    if result.dashboard_url:
        console.print(
            f"Ray dashboard: {result.dashboard_url} (up while the job ran; `ray start --head` keeps one up)"
        )
