"""`capfilt bench throughput`: the command line of `pipelines.bench_throughput`.

capfilt/cli.py adds it to the `bench` command's subparsers with `add_bench_throughput_parser`
and calls `run_bench_throughput_cli(args)`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

PATHS = ("transformers", "exact", "fast", "job")  # what `--paths` may name (no torch import for the parser)


def add_bench_throughput_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "throughput",
        help="CapFilt pairs/s: transformers' loop vs ours (exact and fast) vs the clean job, with MFU",
        description=(
            "Time CapFilt (one nucleus caption per image, ITM on the web text and the caption) over the same "
            "decoded pairs and identical weights: (a) transformers' BLIP classes as a user would call them, "
            "(b) our Captioner + Filter in exact (fp32) and fast (bf16 on GPU (fp16 before Ampere) and AMX CPUs, int8 on other CPUs) "
            "mode, (c) the whole `capfilt clean` job on a local Ray. Prints pairs/s, the ratios, the exactness checks and the model "
            "FLOP utilisation against a dense matmul measured in the same run."
        ),
    )
    p.add_argument("--size", default="small", help="model size of the random checkpoints (default: small)")
    p.add_argument("--pairs", type=int, default=256, help="web pairs timed by each path (default: 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model batch (default: 32)")
    p.add_argument(
        "--image-size", type=int, default=None, help="model resolution (default: the size's fine-tuning one)"
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present"
    )
    p.add_argument(
        "--paths",
        nargs="+",
        default=list(PATHS),
        choices=PATHS,
        help="what to time (default: all): transformers exact fast job",
    )
    p.add_argument("--captioner", default=None, metavar="CKPT", help="default: random weights of --size")
    p.add_argument("--filter", default=None, metavar="CKPT", help="default: random weights of --size")
    p.add_argument("--max-tokens", type=int, default=30, help="caption length bound (default: 30, BLIP's)")
    p.add_argument(
        "--check-images", type=int, default=16, help="images of the exactness checks (default: 16)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds of the timed paths; each path's time is its median round (default: 3)",
    )
    p.add_argument(
        "--scaling",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also run the clean job over N pairs for each N (e.g. 1000 10000): time per pair, peak memory",
    )
    p.add_argument("--workdir", default=None, help="where temporary inputs go (default: the system's temp)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def run_bench_throughput_cli(args: argparse.Namespace) -> int:
    from rich.console import Console

    from capfilt.cli import stdout_to_stderr

    from .bench_throughput import ThroughputConfig, run_throughput

    config = ThroughputConfig(
        size=args.size,
        pairs=args.pairs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        paths=tuple(args.paths),
        captioner=args.captioner,
        filter=args.filter,
        max_tokens=args.max_tokens,
        check_images=args.check_images,
        threads=args.threads,
        seed=args.seed,
        repeats=args.repeats,
        scaling=tuple(args.scaling),
        workdir=args.workdir,
    )
    console = Console(stderr=True)
    with stdout_to_stderr():  # stdout is the result's; the job path runs Ray
        result = run_throughput(config, progress=lambda message: console.print(f"[dim]{message}[/dim]"))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_result(result, Console())
    return 0


def print_result(result: dict[str, Any], console: Any) -> None:
    from rich import box
    from rich.table import Table

    m = result["machine"]
    where = (
        m.get("gpu") if result["device"].startswith("cuda") else f"{m['cpu']}, {m['torch_threads']} threads"
    )
    peaks = ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in result["matmul_tflops"].items())
    console.print(
        f"{result['config']['size']} at {result['image_size']} px on {where}; dense matmul: {peaks}"
    )
    table = Table(box=box.SIMPLE)
    for column in ("path", "pairs", "seconds", "pairs/s", "model TFLOP/s", "MFU"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, p in result["paths"].items():
        table.add_row(
            name,
            str(p["pairs"]),
            f"{p['seconds']:.2f}",
            f"{p['pairs_per_s']:.1f}",
            f"{p['model_tflops']:.3f}" if p["model_tflops"] else "-",
            f"{p['mfu']:.1%}" if p["mfu"] else "-",
        )
    console.print(table)
    for name, value in result.get("ratios", {}).items():
        console.print(f"{name}: {value:.2f}x")
    if result.get("round_ratios"):
        console.print(
            "exact_over_transformers by round: " + ", ".join(f"{r:.2f}x" for r in result["round_ratios"])
        )
    if "stages" in result:
        st = result["stages"]
        stages = Table(box=box.SIMPLE, title="where the time goes (ms per pair, each stage timed alone)")
        for column in ("path", "image encodings", "caption decoding", "text scoring", "total"):
            stages.add_column(column, justify="left" if column == "path" else "right")
        for key, name in (("a", "(a) transformers"), ("b", "(b) exact")):
            row = st[key]
            stages.add_row(
                name,
                *(f"{row[k]:.2f}" for k in ("images", "decoding", "scoring")),
                f"{sum(row.values()):.2f}",
            )
        console.print(stages)
        b = st["bounds"]
        console.print(
            f"stages: (b)/(a) {b['exact_over_transformers']:.2f}x; with our caption decoding taking no time "
            f"at all, {b['without_our_decoding']:.2f}x"
        )
    for key in ("vit", "vit_fast"):
        if key in result:
            v = result[key]
            console.print(
                f"{key}: {v['images_per_s']:.1f} images/s, {v['tflops']:.3f} TFLOP/s, MFU {v['mfu']:.1%}"
            )
    if "exactness" in result:
        e = result["exactness"]
        console.print(
            f"exactness: greedy captions identical {e['greedy_identical']}/{e['images']}, "
            f"ITM max |diff| {e['itm_max_abs_diff']:.2e} over {e['itm_texts']} texts"
        )
    fast = result.get("paths", {}).get("fast", {}).get("notes")
    if fast:
        console.print(
            f"fast ({fast.get('kind', '?')}) vs exact: decisions equal {fast['decision_agreement']:.2%} "
            f"(web {fast['web_decision_agreement']:.2%}, synthetic {fast['synthetic_decision_agreement']:.2%}), "
            f"identical captions {fast['identical_captions']:.2%}, web ITM max |diff| {fast['web_itm_max_abs_diff']:.2e}"
        )
    if "job" in result:
        j = result["job"]
        steady = j["steady_pairs_per_s"]
        console.print(
            f"job: {j['pairs']} pairs in {j['wall_s']:.1f} s ({j['pairs_per_s']:.1f} pairs/s; first shard after "
            f"{j['first_shard_s']:.1f} s; steady {steady:.1f} pairs/s); peak RSS {j['peak_rss_gb']:.2f} GB"
            if steady
            else f"job: {j['pairs']} pairs in {j['wall_s']:.1f} s; peak RSS {j['peak_rss_gb']:.2f} GB"
        )
    for row in result.get("scaling", []):
        steady = row.get("steady_seconds_per_pair")
        console.print(
            f"scaling: {row['pairs']} pairs in {row['wall_s']:.1f} s: {1000 * row['seconds_per_pair']:.2f} ms/pair "
            f"with start-up (first shard after {row['first_shard_s']:.1f} s), "
            + (
                f"{1000 * steady:.2f} ms/pair steady (the middle 80% of samples)"
                if steady
                else "no steady rate"
            )
            + (
                " (10-50%: {:.2f}, 50-90%: {:.2f})".format(
                    *(1000 / r for r in row["steady_pairs_per_s_halves"])
                )
                if row.get("steady_pairs_per_s_halves") and all(row["steady_pairs_per_s_halves"])
                else ""
            )
            + f"; peak RSS {row['peak_rss_gb']:.2f} GB"
        )
    rows = result.get("scaling", [])
    if len(rows) >= 2 and all(r.get("steady_seconds_per_pair") for r in rows):
        first, last = rows[0], rows[-1]
        time_change = last["steady_seconds_per_pair"] / first["steady_seconds_per_pair"] - 1
        with_start = last["seconds_per_pair"] / first["seconds_per_pair"] - 1
        memory_change = last["peak_rss_gb"] / first["peak_rss_gb"] - 1
        console.print(
            f"scaling {first['pairs']} -> {last['pairs']} pairs: time per pair {time_change:+.1%} steady "
            f"({with_start:+.1%} with the start-up), peak memory {memory_change:+.1%}"
        )
