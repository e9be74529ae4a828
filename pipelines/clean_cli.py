"""`capfilt clean`: the command line of `pipelines.clean`.

capfilt/cli.py wires it in with `add_clean_parser(sub)` and prints what `run_clean` returns.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the job module imports torch and the models; `capfilt --help` must stay instant
    from .clean import CleanConfig


def add_clean_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `clean` command to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "clean",
        help="CapFilt img2dataset shards or parquet image tables on Ray: D', a ledger, per-shard stats",
        description=(
            "Caption every image, score web and synthetic texts with the filter, keep those above the "
            "threshold. Writes OUT/dprime (webdataset shards), OUT/dprime_index (their parquet index), OUT/ledger "
            "(one row per input sample), OUT/stats, OUT/manifest.jsonl, OUT/job.json and OUT/report.html. Rerun with --resume to skip finished shards. "
            "Inputs: webdataset tars (img2dataset's X.parquet beside X.tar is read as their sidecar) or parquet "
            "image tables (image bytes in image/jpg/png/webp/image_bytes or a Hugging Face Image struct, or "
            "a path in image_path/path/file relative to the table; text in caption/text/txt; optional key, "
            "url, status, error_message); local paths, globs or fsspec URLs (s3://, gs://, http(s)://...)."
        ),
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="tars or parquet image tables: directories (their tars, else their parquet), files, globs "
        "or fsspec URLs",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="a new or empty directory (or --resume)")
    p.add_argument("--captioner", required=True, metavar="CKPT", help="captioner checkpoint")
    p.add_argument("--filter", required=True, metavar="CKPT", help="filter checkpoint (ITM with [ENC])")
    p.add_argument(
        "--human",
        nargs="+",
        metavar="PATH",
        help="human-annotated shards (same kinds as --input) to add to D' as they are",
    )
    keep = p.add_mutually_exclusive_group()
    keep.add_argument(
        "--threshold", type=float, default=None, help="keep texts with ITM p(match) above it (default: 0.5)"
    )
    keep.add_argument(
        "--keep-fraction",
        type=float,
        default=None,
        metavar="F",
        help="instead of a threshold: keep this fraction of web and best synthetic texts (two passes)",
    )
    p.add_argument(
        "--num-captions",
        type=int,
        default=1,
        metavar="K",
        help="nucleus samples per image, 1-64 (default: 1)",
    )
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus probability mass (default: 0.9)")
    p.add_argument(
        "--top-k",
        type=int,
        default=50,
        help="sample among the K most likely tokens only, 0 for all (default: 50, as BLIP's sampling)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per model batch (default: on CPUs up to 128 as the captioner's memory allows, "
        "128 for the small model and 32 for BLIP-base at 384 px; 32 on GPUs, where larger batches "
        "run faster if they fit)",
    )
    p.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="GPUs per model actor, fractions allowed; 0: CPUs only (default: 1 where the Ray cluster "
        "has GPUs, half of one each where it has one; else CPUs)",
    )
    p.add_argument(
        "--captioner-actors",
        type=int,
        default=None,
        metavar="N",
        help="captioner actors (default: from the cluster's GPUs or CPUs, about 55%% of the model actors)",
    )
    p.add_argument(
        "--filter-actors",
        type=int,
        default=None,
        metavar="N",
        help="filter actors (default: from the cluster's GPUs or CPUs, the rest of the model actors)",
    )
    p.add_argument(
        "--writers",
        type=int,
        default=None,
        metavar="N",
        help="processes writing finished shards beside the pipeline, 1 to 8 (default: 1, and one more "
        "for every 4 GPUs the model actors hold, at most half this machine's CPUs)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the job in --output, skipping finished shards"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed; per sample from (seed, key) (default: 0)"
    )
    p.add_argument(
        "--precision",
        choices=["exact", "fast"],
        default="exact",
        help="exact: fp32; fast: bf16 on GPUs (fp16 before Ampere) and CPUs with AMX, int8 on other CPUs; a few decisions may differ (default: exact)",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    return p


def config_from_args(args: argparse.Namespace) -> CleanConfig:
    from .clean import CleanConfig

    return CleanConfig(
        inputs=list(args.input),
        output=args.output,
        captioner=args.captioner,
        filter=args.filter,
        human=list(args.human) if args.human else None,
        threshold=args.threshold,
        keep_fraction=args.keep_fraction,
        num_captions=args.num_captions,
        top_p=args.top_p,
        top_k=args.top_k,
        batch_size=args.batch_size,
        num_gpus=args.num_gpus,
        captioner_actors=args.captioner_actors,
        filter_actors=args.filter_actors,
        writers=args.writers,
        resume=args.resume,
        seed=args.seed,
        precision=args.precision,
        ray_address=args.ray_address,
    )


def run_clean(args: argparse.Namespace) -> dict[str, Any]:
    """Clean with a progress bar of shards and samples on stderr; returns the summary the CLI prints."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from capfilt.progress import progress_bar

    from .clean import clean, summary_record

    config = config_from_args(args)
    columns = (
        TextColumn("clean shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[samples]} samples"),
    )
    with progress_bar(*columns) as bar:
        task = bar.add_task("clean shards", total=None, samples=0)

        def progress(shards_done: int, shards_total: int, samples_done: int) -> None:
            bar.update(task, completed=shards_done, total=shards_total, samples=samples_done)

        s = clean(config, progress)
    return summary_record(s)
