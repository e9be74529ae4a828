"""`capfilt ingest`: the command line of `pipelines.ingest`.

capfilt/cli.py wires it in with `add_ingest_parser(sub)` and `"ingest": run_ingest` in COMMANDS;
`run_ingest` prints the summary as JSON and returns the exit status.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept out of `capfilt --help`'s imports like the other commands' jobs
    from .ingest import IngestConfig, IngestSummary

FORMATS_HELP = "txt, csv, tsv, json, jsonl, parquet; .gz for all but parquet"


def add_ingest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `ingest` command to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "ingest",
        help="download a url list into img2dataset webdataset shards (the input of `capfilt clean`)",
        description=(
            "Run img2dataset on a url list: OUT gets NNNNN.tar (jpg, txt, json per image), NNNNN.parquet "
            "(one row per url, failures included) and NNNNN_stats.json. Images are checked but not resized "
            "and JPEGs keep their bytes, unless --resize-mode says otherwise. Rerun with --resume to "
            "download only the shards a stopped run left unfinished."
        ),
    )
    p.add_argument(
        "--url-list",
        required=True,
        metavar="PATH",
        help="a file of urls, or a directory of such files (all *.FORMAT in it)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory (or --resume)")
    p.add_argument(
        "--input-format", default=None, help=f"{FORMATS_HELP} (default: from the file name's extension)"
    )
    p.add_argument("--url-col", default="url", metavar="NAME", help="column of the urls (default: url)")
    captions = p.add_mutually_exclusive_group()
    captions.add_argument(
        "--caption-col", default="caption", metavar="NAME", help="column of the web texts (default: caption)"
    )
    captions.add_argument(
        "--no-captions", action="store_true", help="fetch images only (a txt list never has captions)"
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="urls per shard (default: 10000)")
    p.add_argument(
        "--processes", type=int, default=1, help="shards downloaded at once, one process each (default: 1)"
    )
    p.add_argument("--threads", type=int, default=16, help="downloads at once per process (default: 16)")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds a connection or a read may wait (default: 10)"
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=60.0,
        help="seconds a url may take in all, its body included; slower ones are failures (default: 60)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=64 * 2**20,
        help="the largest body fetched; larger ones are failures (default: 67108864, 64 MiB)",
    )
    p.add_argument("--retries", type=int, default=0, help="extra tries of a failed url (default: 0)")
    p.add_argument(
        "--resize-mode",
        default="no",
        choices=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"],
        help="img2dataset's resize; 'no' keeps the served size, BLIP resizes when it loads (default: no)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=384,
        help="with a --resize-mode: shrink larger images to this side, never enlarge (default: 384)",
    )
    p.add_argument(
        "--keep-bytes",
        action="store_true",
        help="store every body as served, not even checked as an image (img2dataset's disable_all_reencoding)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the download in --out, skipping finished shards"
    )
    return p


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    from .ingest import IngestConfig

    return IngestConfig(
        url_list=args.url_list,
        out=args.out,
        input_format=args.input_format,
        url_col=args.url_col,
        caption_col=None if args.no_captions else args.caption_col,
        shard_size=args.shard_size,
        processes=args.processes,
        threads=args.threads,
        timeout=args.timeout,
        deadline=args.deadline,
        max_bytes=args.max_bytes,
        retries=args.retries,
        resize_mode=args.resize_mode,
        image_size=args.image_size,
        keep_bytes=args.keep_bytes,
        resume=args.resume,
    )


def summary_dict(s: IngestSummary) -> dict[str, Any]:
    """The summary as the CLI prints it."""
    return {
        "out": str(s.out),
        "complete": s.complete,
        "shards": s.shards_total,
        "shards_done": s.shards_done,
        "shards_skipped": s.shards_skipped,
        "missing_shards": s.missing_shards,
        "urls": s.count,
        "successes": s.successes,
        "failed_to_download": s.failed_to_download,
        "failed_to_resize": s.failed_to_resize,
        "errors": s.errors,
        "lost_samples": sum(s.lost.values()),  # counted as successes, missing from their tars
        "log": str(s.log),
        "wall_s": round(s.wall_s, 3),
    }


def run_ingest(args: argparse.Namespace) -> int:
    """Download with a progress bar of shards and urls on stderr, print the summary as JSON on
    stdout; 0 when every shard is finished, 1 when img2dataset gave up on some (rerun with --resume)
    or lost samples it counted as successes (the summary's `lost_samples`; the log says why)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from capfilt.progress import progress_bar

    from .ingest import ingest

    config = config_from_args(args)
    console = Console(stderr=True)
    columns = (
        TextColumn("ingest shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[urls]} urls"),
    )
    with progress_bar(*columns) as bar:
        task = bar.add_task("ingest shards", total=None, urls=0)

        def progress(shards_done: int, shards_total: int, urls_done: int) -> None:
            bar.update(task, completed=shards_done, total=shards_total, urls=urls_done)

        s = ingest(config, progress)
    print(json.dumps(summary_dict(s)))
    if s.lost:
        console.print(
            f"[red]img2dataset counted {sum(s.lost.values())} successes that are not in their tars (shards "
            f"{', '.join(s.lost)}): see {s.log}[/red]",
            highlight=False,
        )
        return 1
    if not s.complete:
        console.print(
            f"[yellow]img2dataset did not finish {len(s.missing_shards)} shard(s); see {s.log} and rerun "
            "with --resume[/yellow]",
            highlight=False,
        )
        return 1
    return 0
