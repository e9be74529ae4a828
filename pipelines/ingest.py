"""`capfilt ingest`: fetch a url list into img2dataset webdataset shards, the input of `capfilt clean`.

    summary = ingest(IngestConfig(url_list="urls.parquet", out="runs/web"))

The real img2dataset does the work (`img2dataset.download`, output_format="webdataset"); this module
checks the user's inputs before any download starts, keeps a record of the options that decide the
shards' contents, runs img2dataset in a child process and sums its per-shard `*_stats.json`.

A child process, not a call: `download` installs a SIGINT handler that exits with status 0 (and
fails outside the main thread), prints to stdout (where the CLI writes its JSON) and starts a pool
and a logger process; run in here it would change the caller (the CLI, the REST server, a test
process holding Ray) for good. The child runs in its own session, so an interrupted `ingest` stops
it and every process it started; its output goes to OUT/_ingest/img2dataset.log.

Images: by default img2dataset decodes every image (an HTML page served for a picture becomes
`failed_to_resize`, so its statistics are honest) but does not resize, and keeps a JPEG's bytes as
they were served (`resize_mode="no"`, `skip_reencode=True`; a JPEG that the stdlib's `imghdr`
does not recognise, or any other format, is re-encoded to JPEG q95, as every sample's image is the
`.jpg` member). BLIP resizes on the fly (224
px pre-training, 384 px fine-tuning, CapFilt at 384), so the originals serve every later stage and
D' keeps the served bytes. `resize_mode` + `image_size` shrink larger images (never enlarge) to
save disk; `keep_bytes` (img2dataset's `disable_all_reencoding`) stores any body as it came,
unchecked: a non-image then reaches the clean job and is rejected there as undecodable.

Layout written (img2dataset's, see shared/reference/ecosystem.md):

    OUT/00000.tar            {key}.jpg {key}.txt {key}.json for every downloaded image
    OUT/00000.parquet        one row per url, failures included (status, error_message)
    OUT/00000_stats.json     count, successes, failed_to_download, failed_to_resize, status_dict
    OUT/_ingest/job.json     our record of the options a resume must repeat
    OUT/_ingest/img2dataset.log

Resume: img2dataset skips a shard whose `_stats.json` exists (it is written last), so a rerun with
`resume` downloads only the shards a killed or failed run left unfinished. No other `*.json` may
sit in OUT: img2dataset reads every one as a shard number. A resume must repeat the options that
decide the shards and read the same url list: job.json keeps each url file's size and a hash of
its first and last MiB. Ctrl-C, SIGTERM and SIGHUP stop img2dataset's process group too.

Before any download, the url list's columns are checked as img2dataset will read them: a missing
one, one img2dataset would rename onto a column the list already has, or a url or caption column
of bytes, dates or decimals (img2dataset would drop every downloaded sample of such a list while
counting it a success) stop the job with what to change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from capfilt.errors import CapfiltError, signals_interrupt

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, int], None]  # (shards_done, shards_total, urls_done)
# img2dataset's input formats: "json" is one JSON array of records, "jsonl" one record per line.
PLAIN_FORMATS = ("txt", "csv", "tsv", "json", "jsonl")
FORMATS = (*PLAIN_FORMATS, "parquet", *(f"{f}.gz" for f in PLAIN_FORMATS))
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
RECORD = "_ingest"  # our files in OUT; a directory, as img2dataset parses every OUT/*.json
POLL_S = 0.5

CHILD_ENV = {
    "PYTHONUNBUFFERED": "1",  # the log follows the download
    "NO_ALBUMENTATIONS_UPDATE": "1",  # else each of its processes asks PyPI for a newer albumentations
    "WANDB_MODE": "disabled",
}
# The child: img2dataset's own entry point with typed keyword arguments (no fire parsing), its
# workers fetching through `ingest_fetch` (http and https only, a deadline, a size and pixel limit).
RUNNER = (
    "import functools, importlib, json, sys; from capfilt.pipelines import ingest_fetch; "
    "m = importlib.import_module('img2dataset.main'); "  # the module: the package's `main` is a function
    "kwargs = json.loads(sys.argv[1]); "
    "m.Downloader = functools.partial(ingest_fetch.SafeDownloader, limits=kwargs.pop('capfilt_limits')); "
    "m.download(**kwargs)"
)


@dataclass
class IngestConfig:
    """One download job. `url_list` and `out` are local paths."""

    url_list: str  # a url file, or a directory of them (every `*.{input_format}` in it)
    out: str  # a new or empty directory, or the job's own with `resume`
    input_format: str | None = None  # one of FORMATS; None: from url_list's extension
    url_col: str = "url"  # ignored for txt: one url per line
    caption_col: str | None = "caption"  # the web text; None: images only. Ignored for txt
    shard_size: int = 10_000  # urls per shard (img2dataset's number_sample_per_shard)
    processes: int = 1  # img2dataset's processes_count: shards downloaded at once
    threads: int = 16  # img2dataset's thread_count: downloads at once per process
    timeout: float = 10.0  # seconds a connection or a read may wait (urllib's timeout)
    deadline: float = 60.0  # seconds a url may take in all, its body included
    max_bytes: int = 64 * 2**20  # the largest body fetched; a larger one is that url's failure
    retries: int = 0  # extra tries of a failed url (a 404 is tried again too)
    resize_mode: str = "no"  # "no": keep the served size (BLIP resizes at load time)
    image_size: int = 384  # with a resize_mode: the side to shrink to (BLIP's fine-tuning size)
    keep_bytes: bool = False  # img2dataset's disable_all_reencoding: store bodies unchecked
    resume: bool = False  # continue the job in `out`: finished shards are skipped

    def validate(self) -> None:
        """Raise CapfiltError naming the first bad option (the url list is checked by `ingest`)."""

        def bad(option: str, why: str) -> CapfiltError:
            return CapfiltError(f"--{option} {why}")

        if not self.url_list:
            raise bad("url-list", "is required: a file of urls (txt, csv, tsv, parquet, json, jsonl)")
        if not self.out:
            raise bad("out", "is required: a new or empty directory")
        if self.input_format is not None and self.input_format not in FORMATS:
            raise bad("input-format", f"must be one of {', '.join(FORMATS)}; got {self.input_format!r}")
        for name in ("shard_size", "processes", "threads", "image_size"):
            if getattr(self, name) < 1:
                raise bad(name.replace("_", "-"), f"must be >= 1; got {getattr(self, name)}")
        if not self.timeout > 0:
            raise bad("timeout", f"must be > 0 seconds; got {self.timeout}")
        if not self.deadline >= self.timeout:
            raise bad("deadline", f"must be at least --timeout ({self.timeout:g} s); got {self.deadline}")
        if self.max_bytes < 1:
            raise bad("max-bytes", f"must be >= 1; got {self.max_bytes}")
        if self.retries < 0:
            raise bad("retries", f"must be >= 0; got {self.retries}")
        if self.resize_mode not in RESIZE_MODES:
            raise bad("resize-mode", f"must be one of {', '.join(RESIZE_MODES)}; got {self.resize_mode!r}")
        if self.keep_bytes and self.resize_mode != "no":
            raise bad("keep-bytes", f"stores images unchanged: it excludes --resize-mode {self.resize_mode}")

    def download_kwargs(self, url_list: Path, input_format: str, out: Path) -> dict[str, Any]:
        """The keyword arguments of `img2dataset.download` for this job."""
        tabular = not input_format.startswith("txt")
        return dict(
            url_list=str(url_list),
            output_folder=str(out),
            output_format="webdataset",
            input_format=input_format,
            url_col=self.url_col,
            caption_col=self.caption_col if tabular else None,
            number_sample_per_shard=self.shard_size,
            processes_count=self.processes,
            thread_count=self.threads,
            timeout=self.timeout,
            retries=self.retries,
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=True,  # shrink, never enlarge: BLIP's transforms upscale when needed
            skip_reencode=True,  # a JPEG that needs no resize keeps its bytes
            disable_all_reencoding=self.keep_bytes,
            encode_format="jpg",
            encode_quality=95,
            incremental_mode="incremental",  # never "overwrite": it deletes OUT
            enable_wandb=False,
            distributor="multiprocessing",
            capfilt_limits={
                "max_bytes": self.max_bytes,
                "deadline_s": self.deadline,
            },  # RUNNER's, not img2dataset's
        )


@dataclass
class IngestSummary:
    """What OUT holds after the run, summed over every shard's `_stats.json` (earlier runs' too)."""

    out: Path
    shards_total: int  # shards the url list makes
    shards_done: int  # shards with a stats file
    shards_skipped: int  # done before this run (resume)
    missing_shards: list[str]  # names of shards img2dataset gave up on: rerun with resume
    count: int = 0  # urls in finished shards
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # img2dataset's error message -> urls, most first
    # shard -> samples img2dataset counted as successes that its tar does not hold (shards of this run)
    lost: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    log: Path | None = None

    @property
    def complete(self) -> bool:
        return not self.missing_shards


def ingest(config: IngestConfig, progress: ProgressFn | None = None) -> IngestSummary:
    """Download `config.url_list` into webdataset shards in `config.out` with img2dataset."""
    config.validate()
    url_list = Path(config.url_list).absolute()
    input_format = config.input_format or _infer_format(url_list)
    files = _url_files(url_list, input_format)
    shards_total = sum(math.ceil(_check_url_file(f, input_format, config) / config.shard_size) for f in files)
    out = Path(config.out).absolute()
    job = {
        "url_list": str(url_list),
        "input_format": input_format,
        **_shard_options(config),
        "url_files": [_fingerprint(f) for f in files],
    }
    _prepare(out, job, config.resume)

    names = [f"{i:05d}" for i in range(shards_total)]  # img2dataset's oom_shard_count is 5
    done = read_stats(out, names)
    skipped = len(done)
    before = set(done)

    def report() -> None:
        nonlocal done
        done = read_stats(out, names, done)
        if progress is not None:
            finished = sum(s["count"] for s in done.values())
            progress(
                len(done), shards_total, finished + read_progress(out, [n for n in names if n not in done])
            )

    log_path = out / RECORD / "img2dataset.log"
    start = time.perf_counter()
    if skipped < shards_total:
        log.info("img2dataset: %d shards (%d done before), log in %s", shards_total, skipped, log_path)
        shutil.rmtree(out / RECORD / "progress", ignore_errors=True)  # an earlier run's counts
        try:
            _run_img2dataset(config.download_kwargs(url_list, input_format, out), log_path, report)
        except KeyboardInterrupt as err:
            report()
            raise KeyboardInterrupt(
                f"ingest {str(err) or 'interrupted'}: {len(done)} of {shards_total} shards are finished in {out}; "
                "rerun the same command with --resume to fetch the rest"
            ) from err
    report()
    summary = _summary(out, names, done, skipped, time.perf_counter() - start, log_path)
    summary.lost = lost_samples(out, [n for n in names if n in done and n not in before])
    if summary.lost:
        log.warning("img2dataset counted successes its tars do not hold: %s (see %s)", summary.lost, log_path)
    return summary


def lost_samples(out: Path, names: list[str]) -> dict[str, int]:
    """Per shard among `names`, how many of its `_stats.json` successes its tar lacks (img2dataset
    drops a sample it cannot write after counting it), where any are."""
    import tarfile

    lost = {}
    for name in names:
        counted = json.loads((out / f"{name}_stats.json").read_text()).get("successes", 0)
        try:
            with tarfile.open(out / f"{name}.tar") as tar:
                held = len({m.name.partition(".")[0] for m in tar if m.isfile()})
        except (OSError, tarfile.TarError):
            held = 0
        if held < counted:
            lost[name] = counted - held
    return lost


def _run_img2dataset(kwargs: dict[str, Any], log_path: Path, poll: Callable[[], None]) -> None:
    """`img2dataset.download(**kwargs)` in a child process whose output is appended to `log_path`;
    `poll()` every POLL_S seconds while it runs. Raises RuntimeError when img2dataset fails."""
    with log_path.open("ab") as sink, signals_interrupt():
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(kwargs)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV},
            start_new_session=True,  # its pool and logger processes share a group we can stop
        )
        try:
            while proc.poll() is None:
                poll()
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C reaches only us): stop img2dataset's group
                _stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited with status {proc.returncode}: {_tail(log_path)}")


def read_progress(out: Path, names: list[str]) -> int:
    """Urls answered so far in the unfinished shards `names`, from the files the download workers
    keep (`ingest_fetch`); a shard not started has none."""
    total = 0
    for name in names:
        try:
            total += int((out / RECORD / "progress" / name).read_text())
        except (OSError, ValueError):
            continue
    return total


def read_stats(
    out: Path, names: list[str], known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The `_stats.json` of each finished shard among `names`, by shard name; `known` (an earlier
    answer) is not read again: a stats file is written once, when its shard is complete."""
    stats = dict(known or {})
    wanted = set(names) - set(stats)
    for path in out.glob("*_stats.json"):
        name = path.name.removesuffix("_stats.json")
        if name not in wanted:
            continue
        try:
            stats[name] = json.loads(path.read_text())
        except json.JSONDecodeError:  # being written: read at the next poll
            continue
    return stats


def _summary(
    out: Path, names: list[str], done: dict[str, dict[str, Any]], skipped: int, wall_s: float, log_path: Path
) -> IngestSummary:
    errors: Counter[str] = Counter()
    for s in done.values():
        errors.update(s.get("status_dict", {}))  # error message -> urls; "success" counted too
    errors.pop("success", None)
    missing = [n for n in names if n not in done]
    if missing:
        log.warning("img2dataset did not finish shards %s (see %s); rerun with --resume", missing, log_path)
    return IngestSummary(
        out=out,
        shards_total=len(names),
        shards_done=len(done),
        shards_skipped=skipped,
        missing_shards=missing,
        count=sum(s["count"] for s in done.values()),
        successes=sum(s["successes"] for s in done.values()),
        failed_to_download=sum(s["failed_to_download"] for s in done.values()),
        failed_to_resize=sum(s["failed_to_resize"] for s in done.values()),
        errors=dict(errors.most_common()),
        wall_s=wall_s,
        log=log_path,
    )


def _infer_format(url_list: Path) -> str:
    name = url_list.name.lower()
    found = [f for f in FORMATS if name.endswith(f".{f}")]
    if not found:
        raise CapfiltError(
            f"--url-list {url_list}: cannot tell its format from the name; pass --input-format "
            f"({', '.join(FORMATS)})"
        )
    return max(found, key=len)  # "x.json.gz" is json.gz, not gz of nothing


def _url_files(url_list: Path, input_format: str) -> list[Path]:
    """The files img2dataset will read: the file itself, or a directory's `*.{input_format}`."""
    if url_list.is_dir():
        files = sorted(url_list.glob(f"*.{input_format}"))
        if not files:
            raise CapfiltError(f"--url-list {url_list} is a directory without *.{input_format} files")
        return files
    if not url_list.is_file():
        raise CapfiltError(f"--url-list {url_list} does not exist")
    return [url_list]


def _check_url_file(path: Path, input_format: str, config: IngestConfig) -> int:
    """Rows of one url file, read as img2dataset reads it; raises CapfiltError naming a missing
    column, one img2dataset would rename onto another, or one of a type it would lose."""
    schema, rows = _schema_and_rows(path, input_format)
    if rows == 0:
        raise CapfiltError(f"--url-list {path} holds no urls")
    if input_format.startswith("txt"):
        return rows
    columns = schema.names
    wanted = {"--url-col": (config.url_col, "url"), "--caption-col": (config.caption_col, "caption")}
    for option, (column, renamed) in wanted.items():
        if column is None:
            continue
        if column not in columns:
            hint = " (or --no-captions to fetch images only)" if option == "--caption-col" else ""
            raise CapfiltError(
                f"--url-list {path} has no column {column!r} (it has: {', '.join(columns) or 'none'}); "
                f"name the right one with {option}{hint}"
            )
        if column != renamed and renamed in columns:  # img2dataset renames `column` to `renamed`
            raise CapfiltError(
                f"--url-list {path}: img2dataset renames column {column!r} to {renamed!r}, which the list "
                f"also has; rename or drop its {renamed!r} column"
            )
        kind = schema.field(column).type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or _lossy(kind):
            what = "bytes that are not UTF-8 text" if "binary" in str(kind) else f"{kind} values"
            raise CapfiltError(
                f"--url-list {path}: column {column!r} is read as {what}; img2dataset would drop every "
                f"downloaded sample while counting it a success. Write the list as UTF-8 text, or as "
                f"parquet with a string {column!r} column"
            )
    return rows


def _lossy(kind: pa.DataType) -> bool:
    """Types img2dataset cannot write into a sample's .json (dates, times, decimals)."""
    return pa.types.is_temporal(kind) or pa.types.is_decimal(kind)


def _schema_and_rows(path: Path, input_format: str) -> tuple[pa.Schema, int]:
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    fmt = input_format.removesuffix(".gz")
    try:
        if fmt == "parquet":
            meta = pq.ParquetFile(path).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
        if fmt == "json":  # a JSON array of records, read by pandas as img2dataset does
            import pandas as pd

            frame = pd.read_json(path)
            return pa.Table.from_pandas(frame).schema, len(frame)
        if fmt == "jsonl":
            table = pa_json.read_json(path)
        elif fmt == "txt":
            table = pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(column_names=["url"]))
        else:
            delimiter = "\t" if fmt == "tsv" else ","
            table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowException, ValueError, OSError) as err:
        if "Empty CSV file" in str(err):
            return pa.schema([]), 0
        raise CapfiltError(f"--url-list {path} cannot be read as {input_format}: {err}") from err
    return table.schema, table.num_rows


def _shard_options(config: IngestConfig) -> dict[str, Any]:
    """The options that decide what each shard holds: a resume must repeat them."""
    keys = ("url_col", "caption_col", "shard_size", "resize_mode", "image_size", "keep_bytes")
    return {k: v for k, v in asdict(config).items() if k in keys}


def _prepare(out: Path, job: dict[str, Any], resume: bool) -> None:
    """Create or reopen OUT; with `resume` the saved job must match this one."""
    record = out / RECORD / "job.json"
    if out.exists() and not out.is_dir():
        raise CapfiltError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise CapfiltError(
                f"--out {out} is not empty; pass --resume to continue the download there, "
                "or choose another directory"
            )
        if not record.is_file():
            raise CapfiltError(f"--out {out} holds files but no {RECORD}/job.json: not an ingest output")
        saved = json.loads(record.read_text())
        # (a job.json written before url files were fingerprinted resumes on its options alone)
        diff = [
            "the url list's contents changed since (its rows would land in other shards)"
            if k == "url_files"
            else f"{k}: saved {saved.get(k)!r}, now {job[k]!r}"
            for k in job
            if saved.get(k) != job[k] and (k in saved or k != "url_files")
        ]
        if diff:
            raise CapfiltError(
                f"--resume in {out}: the download was started with other arguments ({'; '.join(diff)}); "
                "rerun with the saved ones or choose another --out"
            )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(job, indent=2) + "\n")


def _fingerprint(path: Path, edge: int = 2**20) -> dict[str, Any]:
    """What identifies a url file's contents for a resume: its size and a hash of its first and
    last MiB (a row added, removed or moved at either end changes it), cheap for any size."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            digest.update(f.read(edge))
    return {"path": str(path), "bytes": size, "sha256_ends": digest.hexdigest()}


def _stop(proc: subprocess.Popen, term_s: float = 10.0) -> None:
    """Stop img2dataset's whole process group and wait until every member is gone, not only its
    main process: its pool workers may otherwise go on writing into the output for a moment after
    the CLI has returned."""
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. Zombies do not count: a worker orphaned by
    img2dataset's main process stays one for good where PID 1 does not reap (many containers)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
                state, _, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if int(pgrp) == pgid and state not in ("Z", "X"):
                return True
    return False


def _tail(path: Path, lines: int = 20) -> str:
    """The end of the child's log: the traceback of a failed img2dataset."""
    text = path.read_text(errors="replace").splitlines()
    return f"see {path}; last lines:\n" + "\n".join(text[-lines:])
