"""What the clean job writes, one input shard at a time, and how it knows what is finished.

Layout under the output directory (NNNNN = the shard id: web inputs first, then human ones):

    job.json               the arguments that decide the result (a resume must match them)
    dprime/NNNNN.tar       D' pairs in webdataset layout: {key}.jpg (the input's bytes: .png, .webp...
                           when the input's are), .txt, .json (the input's .json or table row, + ours)
    dprime_index/NNNNN.parquet  the index of those pairs (`capfilt.ledger.DPRIME_INDEX_SCHEMA`); kept out
                           of dprime/ so that `ray.data.read_webdataset(".../dprime")` reads only tars
    ledger/NNNNN.parquet   one row per input sample (`capfilt.ledger.LEDGER_SCHEMA`); web shards only
    stats/NNNNN.json       counts by status and reason, pairs kept
    manifest.jsonl         one line per finished shard: the unit of resume
    threshold.json         keep-fraction jobs: the threshold picked over every score
    scored/NNNNN.parquet   keep-fraction jobs, while running: scored rows awaiting the threshold

Every file is written as `name.tmp` and renamed when complete; a shard's manifest line is
appended only after all of its files are renamed. A killed job leaves at most `.tmp` files
(removed on resume) and files of a shard without a manifest line (rewritten on resume). A write
that fails (a full disk, no permission) stops the job with a CapfiltError naming the file; the
shard it was writing has no manifest line, so `--resume` writes it again once the cause is fixed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.decision import DEFAULT_THRESHOLD
from capfilt.errors import CapfiltError, changed_arguments
from capfilt.images import ImageError, check_image
from capfilt.ledger import DPRIME_INDEX_SCHEMA, MISSING_IMAGE, OK, kept_pairs, table
from capfilt.text import is_blank

from .clean_inputs import InputSample, read_input

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
JOB = "job.json"
SUBDIRS = ("dprime", "dprime_index", "ledger", "stats")


@dataclass(frozen=True)
class Shard:
    """One input shard and the id of its outputs."""

    id: int
    source: str  # a tar or parquet image table, as `capfilt.data.input_files` names it (path or URL)
    kind: str  # "web" (cleaned, with ledger rows) or "human" (copied into D')

    @property
    def name(self) -> str:
        return f"{self.id:05d}"


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError of writing `path` into a CapfiltError that names it and says what to do."""
    try:
        yield
    except OSError as err:
        why = err.strerror or str(err)
        raise CapfiltError(
            f"cannot write {path}: {why}; free space or fix permissions there, then rerun with --resume"
        ) from err


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write to `path.tmp` with `write`; returns the temporary path (renamed later)."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(tmp):
        write(tmp)
    return tmp


def _commit(temps: Sequence[Path]) -> None:
    for tmp in temps:
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        with _writing(final):
            tmp.replace(final)


def write_json(path: Path, data: Any) -> None:
    """A JSON file written whole or not at all."""
    _commit([_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))])


def write_parquet(path: Path, data: pa.Table) -> None:
    """A parquet file written whole or not at all."""
    _commit([_atomic(path, lambda p: pq.write_table(data, p))])


def changed_job_arguments(saved: Any, job: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """ "name: saved X, now Y" for each argument of `job` that differs from a saved job.json's,
    leaving out the keys in `ignore`."""
    if not isinstance(saved, dict):
        return [f"job.json: saved {type(saved).__name__}, not the arguments of a job"]
    saved, job = dict(saved), {"precision": "exact", **job}
    if "threshold" in saved and saved["threshold"] is None and saved.get("keep_fraction") is None:
        saved["threshold"] = DEFAULT_THRESHOLD  # written before job.json held the default
    saved.setdefault("precision", "exact")  # named in job.json only when not the default
    return changed_arguments(
        {k: v for k, v in saved.items() if k not in ignore}, {k: v for k, v in job.items() if k not in ignore}
    )


def forget_unstarted(out: Path, existed: bool) -> None:
    """Undo `prepare` on an output that was empty or absent and where nothing else was written
    (the job could not start): `job.json` and the empty folders go, so the same command can run
    again without --resume."""
    (out / JOB).unlink(missing_ok=True)
    for sub in (*SUBDIRS, *([] if existed else [""])):
        with contextlib.suppress(OSError):  # not empty: leave it
            (out / sub).rmdir()


def prepare(out: Path, job: dict[str, Any], resume: bool) -> set[str]:
    """Create or reopen the output directory; returns the names of finished shards.

    Without `resume` the directory must be empty or absent. With it, `job.json` must match `job`
    (a different threshold, seed or checkpoint would mix two results in one D')."""
    if out.exists() and not out.is_dir():
        raise CapfiltError(f"--output {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise CapfiltError(
                f"--output {out} is not empty; pass --resume to continue the job there, or choose another directory"
            )
        if not (out / JOB).is_file():
            raise CapfiltError(f"--output {out} holds files but no {JOB}: it is not a clean job's output")
        saved = _read_json(out / JOB, "the arguments the job was started with")
        diff = changed_job_arguments(saved, job)
        if diff:
            raise CapfiltError(
                f"--resume in {out}: the job was started with other arguments ({'; '.join(diff)}); "
                "rerun with the saved ones or choose another --output"
            )
    for sub in SUBDIRS:
        with _writing(out / sub):
            (out / sub).mkdir(parents=True, exist_ok=True)
    for tmp in out.rglob("*.tmp"):  # half-written files of a killed run
        log.info("removing unfinished %s", tmp)
        with _writing(tmp):
            tmp.unlink()
    write_json(out / JOB, job)
    return set(read_manifest(out))


def read_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Finished shards by name. A last line cut short by a kill is dropped from the file."""
    path = out / MANIFEST
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries.append((entry["shard"], entry))
        except (ValueError, TypeError, KeyError) as err:
            raise CapfiltError(
                f"{path} line {number} is not a manifest entry ({err}): the file was changed by hand or "
                "damaged; remove that line to write its shard again on --resume"
            ) from err
    return dict(entries)


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of the output directory, or CapfiltError saying which and what to do."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CapfiltError(
            f"cannot read {path}, {what} ({err}); restore it, or choose another --output"
        ) from err


def record_shard(out: Path, entry: dict[str, Any]) -> None:
    """A finished shard's manifest line: whole or cut short (`read_manifest` drops a cut line): never a shard half-listed."""
    with _writing(out / MANIFEST), open(out / MANIFEST, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_tar(path: Path, records: list[dict[str, Any]]) -> None:
    """A webdataset tar: each record's members `{__key__}.{ext}` in extension order, as
    webdataset's `TarWriter` writes them (byte for byte), without importing webdataset, which
    imports torch: a writer process would take 0.5 GB more and seconds longer to start."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for record in records:
            for ext in sorted(k for k in record if k != "__key__"):
                data = record[ext]
                member = tarfile.TarInfo(f"{record['__key__']}.{ext}")
                # mtime an int: a float one (0.0) costs every member a 1 KiB PAX header, 40% of a
                # small-image D'
                member.size, member.mtime, member.mode = len(data), 0, 0o444
                member.uname = member.gname = ""
                tar.addfile(member, io.BytesIO(data))


def _record(sample: InputSample, key: str, text: str, extra: dict[str, Any]) -> dict[str, Any]:
    assert sample.image is not None
    meta = {**sample.meta, "key": key, "caption": text, "source_key": sample.key, **extra}
    if extra["origin"] != "human" and "captions" in meta:
        # A json "captions" list is read by training as the pair's texts (human phrasings,
        # `capfilt.data.sample_captions`): a web or synthetic pair keeps the input's list under
        # another name, or it would train on the web texts the filter judged, not on its .txt.
        meta["source_captions"] = meta.pop("captions")
    return {
        "__key__": key,
        sample.ext: sample.image,  # the input's bytes: never re-encoded
        "txt": text.encode(),
        "json": json.dumps(finite_json(meta), sort_keys=True, allow_nan=False).encode(),
    }


def finite_json(value: Any) -> Any:
    """`value` with NaN and infinite floats as None: JSON has no such numbers (Python writes a
    bare NaN that jq, JavaScript and DuckDB refuse), and a table's float column may hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def _finish(
    out: Path,
    shard: Shard,
    records: list[dict[str, Any]],
    index: list[dict[str, Any]],
    ledger: pa.Table | None,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Write one shard's files under temporary names and rename them all; returns its manifest
    line, which `record_shard` appends once they are renamed."""
    n = shard.name
    temps = [
        _atomic(out / "dprime" / f"{n}.tar", lambda p: _write_tar(p, records)),
        _atomic(
            out / "dprime_index" / f"{n}.parquet",
            lambda p: pq.write_table(table(index, DPRIME_INDEX_SCHEMA), p),
        ),
        _atomic(
            out / "stats" / f"{n}.json", lambda p: p.write_text(json.dumps(stats, indent=2, sort_keys=True))
        ),
    ]
    if ledger is not None:
        temps.append(_atomic(out / "ledger" / f"{n}.parquet", lambda p: pq.write_table(ledger, p)))
    _commit(temps)
    return {
        "shard": n,
        "kind": shard.kind,
        "input": shard.source,
        "samples": stats["samples"],
        "dprime_pairs": len(records),
    }


def write_web_shard(out: Path, shard: Shard, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`write_web_files`, then the shard's manifest line; returns the stats."""
    stats, entry = write_web_files(out, shard, rows)
    record_shard(out, entry)
    return stats


def write_web_files(
    out: Path, shard: Shard, rows: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """D' pairs, ledger and stats of one cleaned shard from its ledger rows; returns the stats and
    the manifest line that makes the shard finished (`record_shard`).

    Image bytes are copied from the input, which is read again here (`read_input`, for the kept
    samples only): they never travel through the model stages. That read also gives the shard's
    read error (a tar cut short or corrupt), recorded in the stats as `read_error`."""
    # Rows arrive in any order; a key repeated in the input has one row per sample: sort them all.
    rows = sorted(rows, key=lambda r: (r["key"], r["status"], r["error_message"] or ""))
    wanted = {r["key"] for r in rows if kept_pairs(r)}
    found, error = read_input(shard.source, wanted)
    if error:
        log.warning("%s; the %d samples it accounts for are in the ledger", error, len(rows))
    samples: dict[str, InputSample] = {}
    for s in found:
        samples.setdefault(s.key, s)  # a key repeated in the input: its first sample is the scored one
    missing = {k for k in wanted if k not in samples or samples[k].image is None}
    if missing:  # read once more: a remote store or a network may have failed for a moment
        again, error_again = read_input(shard.source, missing)
        for s in again:
            if s.image is not None and (s.key not in samples or samples[s.key].image is None):
                samples[s.key] = s
        error = error or error_again
    records, index = [], []
    taken = {r["key"] for r in rows}  # input keys: a synthetic pair's key never takes one
    for i, row in enumerate(rows):
        sample = samples.get(row["key"])
        if kept_pairs(row) and (sample is None or sample.image is None):
            # Scored and kept, but its image is gone now: the ledger says so, and D' holds nothing
            # the ledger does not. Its scores stay as evidence.
            why = (
                f"its image could not be read again to copy it into D' ({error or 'no longer in the shard'})"
            )
            log.warning("%s: %s %s", shard.source, row["key"], why)
            rows[i] = row = {
                **row,
                "status": MISSING_IMAGE,
                "reason": MISSING_IMAGE,
                "error_message": why,
                "web_kept": False,
                "synthetic_kept": [],
            }
        for key, origin, text, itm in kept_pairs(row):
            assert sample is not None and sample.image is not None
            if origin != "web":
                key = _free_key(key, taken)
            records.append(_record(sample, key, text, {"origin": origin, "itm": itm}))
            index.append(
                {
                    "key": key,
                    "source_key": row["key"],
                    "origin": origin,
                    "text": text,
                    "itm": itm,
                    "shard": shard.source,
                }
            )
    stats = {
        "shard": shard.name,
        "kind": shard.kind,
        "input": shard.source,
        "samples": len(rows),
        "ok": sum(r["status"] == OK for r in rows),
        "status": dict(sorted(Counter(r["status"] for r in rows).items())),
        "reasons": dict(sorted(Counter(r["reason"] for r in rows).items())),
        "web_kept": sum(bool(r["web_kept"]) for r in rows),
        "synthetic_kept": sum(len(r["synthetic_kept"]) for r in rows),
        "dprime_pairs": len(records),
        "threshold": rows[0]["threshold"] if rows else None,
        "read_error": error,
    }
    return stats, _finish(out, shard, records, index, table(rows), stats)


def _human_problem(sample: InputSample) -> tuple[str, str] | None:
    """(reason, message) when a human-annotated sample cannot go into D': no image, an image that
    is empty, of no web format or too large (its header is read, not the whole image), no text."""
    if sample.status != OK or sample.image is None:
        return sample.status, sample.error_message or f"{sample.key} has no image"
    try:
        check_image(sample.image, name=sample.key)
    except ImageError as err:
        return err.reason, str(err)
    if is_blank(sample.text):
        return "no_text", f"{sample.key} has no text (.txt, or a caption in its .json or table row)"
    return None


def _free_key(key: str, taken: set[str]) -> str:
    """`key`, or `key_2`, `key_3`... when an input key or an earlier pair of the tar has it (an input
    key `x_s0` beside the synthetic pair `x_s0` of the input `x`): two samples of one key in a D' tar
    would be read as one. Marks the key taken."""
    free, n = key, 1
    while free in taken:
        n += 1
        free = f"{key}_{n}"
    taken.add(free)
    return free


def write_human_shard(out: Path, shard: Shard) -> dict[str, Any]:
    """`write_human_files`, then the shard's manifest line; returns the stats."""
    stats, entry = write_human_files(out, shard)
    record_shard(out, entry)
    return stats


def write_human_files(out: Path, shard: Shard) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copy a human-annotated shard into D' (origin "human", key `{key}_h`); returns the stats and
    the shard's manifest line (`record_shard`). A sample that cannot be copied is listed in the
    stats' `skipped_samples` with its reason."""
    samples, error = read_input(shard.source)
    records, index = [], []
    skipped: list[dict[str, str | None]] = []
    for s in sorted(samples, key=lambda s: s.key):
        text = s.text
        problem = _human_problem(s)
        if problem is not None or text is None:
            reason, message = problem or ("no_text", None)
            log.warning("human shard %s: skipping %s: %s", shard.source, s.key, message)
            skipped.append({"key": s.key, "reason": reason, "error_message": message})
            continue
        key = f"{s.key}_h"
        records.append(_record(s, key, text, {"origin": "human", "itm": None}))
        index.append(
            {
                "key": key,
                "source_key": s.key,
                "origin": "human",
                "text": text,
                "itm": None,
                "shard": shard.source,
            }
        )
    stats = {
        "shard": shard.name,
        "kind": shard.kind,
        "input": shard.source,
        "samples": len(samples),
        "skipped": len(skipped),
        "skipped_reasons": dict(sorted(Counter(str(k["reason"]) for k in skipped).items())),
        "skipped_samples": skipped,
        "read_error": error,
        "dprime_pairs": len(records),
    }
    return stats, _finish(out, shard, records, index, None, stats)


def read_stats(out: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """The stats files of the named shards."""
    return [json.loads((out / "stats" / f"{n}.json").read_text()) for n in names]
