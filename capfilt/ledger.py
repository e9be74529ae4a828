"""The cleaning job's records: the ledger (one row per input sample) and the index of D' pairs.

A ledger row says what happened to one input sample and why:

- `status`: "ok" when the image was decoded and scored; otherwise img2dataset's status for a sample
  that never reached the tar ("failed_to_download", "failed_to_resize"), or ours: "missing_image"
  (the tar has the key without an image, the sidecar lists a success the tar lacks, or a damaged
  tar lost it), the `capfilt.images.ImageError` reasons ("image_undecodable", "image_empty",
  "image_too_large"), "text_too_large" (a web text over `clean_inputs.MAX_TEXT_BYTES`: not kept),
  "duplicate_key" (a key met again in its shard: the first sample with it is
  the one cleaned) and "invalid_key" (a table key with a ".").
- `reason`: for "ok" rows the decision's reason code (`capfilt.decision.REASONS`), else the status.
- every score the filter gave (`web_itm`, `web_itc`, the `synthetic` candidates with theirs), what
  was kept, the threshold, the checkpoints' digests and the job seed, so a row can be reproduced.

Every input sample has one row, so a key repeated in a shard has one row per sample. Rows are
plain dicts with the fields of `LEDGER_SCHEMA`; `table` turns them into pyarrow. The ledger is the
only per-sample record: the report, keep-fraction re-decisions and D' are all derived from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from .decision import Rule, Scored, decide

if TYPE_CHECKING:  # curate imports the models: the ledger's readers and writers need neither
    from .curate import Curated

MAX_SEED = 2**63 - 1  # the ledger's seed column is int64
OK = "ok"
MISSING_IMAGE = "missing_image"

CANDIDATE_TYPE = pa.struct([("text", pa.string()), ("itm", pa.float64()), ("itc", pa.float64())])

LEDGER_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the img2dataset key
        ("shard", pa.string()),  # the input tar it came from
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error_message", pa.string()),  # null for ok rows
        ("url", pa.string()),
        ("web_text", pa.string()),  # null when the sample had none
        ("web_itm", pa.float64()),  # ITM p(match) with [ENC]; null when not scored
        ("web_itc", pa.float64()),  # ITC cosine; null when not scored
        ("web_kept", pa.bool_()),
        ("synthetic", pa.list_(CANDIDATE_TYPE)),  # the K candidates in sampling order
        ("synthetic_kept", pa.list_(pa.string())),  # kept candidates, best first
        ("threshold", pa.float64()),
        ("captioner_id", pa.string()),  # checkpoint digests ("sha256:...")
        ("filter_id", pa.string()),
        ("seed", pa.int64()),  # job seed; a sample's sampling seed is curate.sample_seed(seed, key)
    ]
)

# One row per pair of D': where its text came from and its score (null for human pairs).
DPRIME_INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the D' key: the input key, `{key}_s{j}` (`_2`... if taken) or `{key}_h`
        ("source_key", pa.string()),  # the input sample's key
        ("origin", pa.string()),  # "web", "synthetic" or "human"
        ("text", pa.string()),
        ("itm", pa.float64()),
        ("shard", pa.string()),  # the input tar
    ]
)


def ok_row(
    curated: Curated,
    *,
    shard: str,
    url: str | None,
    threshold: float,
    captioner_id: str,
    filter_id: str,
    seed: int,
) -> dict[str, Any]:
    """The ledger row of a sample that was captioned, scored and decided."""
    d = curated.decision
    return {
        "key": curated.key,
        "shard": shard,
        "status": OK,
        "reason": d.reason,
        "error_message": None,
        "url": url,
        "web_text": curated.web_text,
        "web_itm": curated.web_itm,
        "web_itc": curated.web_itc,
        "web_kept": d.web_kept,
        "synthetic": [{"text": c.text, "itm": c.itm, "itc": c.itc} for c in curated.synthetic],
        "synthetic_kept": [s.text for s in d.synthetic_kept],
        "threshold": threshold,
        "captioner_id": captioner_id,
        "filter_id": filter_id,
        "seed": seed,
    }


def failed_row(
    key: str,
    *,
    shard: str,
    status: str,
    error_message: str | None,
    web_text: str | None,
    url: str | None,
    threshold: float,
    captioner_id: str,
    filter_id: str,
    seed: int,
) -> dict[str, Any]:
    """The ledger row of a sample that never reached the models (nothing kept, reason = status)."""
    assert status != OK
    return {
        "key": key,
        "shard": shard,
        "status": status,
        "reason": status,
        "error_message": error_message,
        "url": url,
        "web_text": web_text,
        "web_itm": None,
        "web_itc": None,
        "web_kept": False,
        "synthetic": [],
        "synthetic_kept": [],
        "threshold": threshold,
        "captioner_id": captioner_id,
        "filter_id": filter_id,
        "seed": seed,
    }


def _scored(row: dict[str, Any]) -> tuple[Scored | None, list[Scored]]:
    web = None
    if row["web_itm"] is not None and row["web_text"] is not None:
        web = Scored(row["web_text"], float(row["web_itm"]))
    return web, [Scored(c["text"], float(c["itm"])) for c in row["synthetic"]]


def redecide(row: dict[str, Any], rule: Rule) -> dict[str, Any]:
    """The row with `rule` applied again to its stored scores (a keep-fraction threshold)."""
    out = {**row, "threshold": rule.threshold}
    if row["status"] != OK:
        return out
    decision = decide(*_scored(row), rule)
    out.update(
        reason=decision.reason,
        web_kept=decision.web_kept,
        synthetic_kept=[s.text for s in decision.synthetic_kept],
    )
    return out


def judged_scores(rows: Iterable[dict[str, Any]], rule: Rule) -> list[float]:
    """The ITM scores `rule` compares with the threshold: each ok row's web text and its best
    `rule.synthetic_per_image` candidates. Feed them to `threshold_for_keep_fraction`."""
    out: list[float] = []
    for row in rows:
        if row["status"] != OK:
            continue
        web, synthetic = _scored(row)
        if web is not None:
            out.append(web.itm)
        best = sorted((s.itm for s in synthetic), reverse=True)
        out.extend(best[: rule.synthetic_per_image])
    return out


def kept_pairs(row: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """(D' key, origin, text, itm) of every pair a ledger row puts into D'.

    The kept web text keeps the input key; the j-th kept candidate (best first) is `{key}_s{j}`
    (the D' writer adds `_2`, `_3`... where another input of the shard has that key).
    No dots: webdataset splits a member name at its first dot."""
    out: list[tuple[str, str, str, float]] = []
    if row["web_kept"]:
        assert row["web_text"] is not None and row["web_itm"] is not None
        out.append((row["key"], "web", row["web_text"], float(row["web_itm"])))
    itm = {c["text"]: float(c["itm"]) for c in row["synthetic"]}
    for j, text in enumerate(row["synthetic_kept"]):
        out.append((f"{row['key']}_s{j}", "synthetic", text, itm[text]))
    return out


def table(rows: Sequence[dict[str, Any]], schema: pa.Schema = LEDGER_SCHEMA) -> pa.Table:
    """Rows (dicts with the schema's fields) as a pyarrow table; NaN scores become null."""
    clean = []
    for row in rows:
        fixed = {name: row[name] for name in schema.names}
        for name in ("web_itm", "web_itc", "itm"):
            value = fixed.get(name)
            if isinstance(value, float) and math.isnan(value):
                fixed[name] = None
        clean.append(fixed)
    return pa.Table.from_pylist(clean, schema=schema)


def read_ledger(output: str | Path) -> pa.Table:
    """Every ledger row a cleaning job wrote under `output`: its finished shards, and while a job
    runs or after it was killed, a shard whose files are in place but not yet in the manifest (a
    resume writes that shard again)."""
    files = sorted((Path(output) / "ledger").glob("*.parquet"))
    if not files:
        return LEDGER_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=LEDGER_SCHEMA) for f in files])
