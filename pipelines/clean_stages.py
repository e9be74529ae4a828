"""The clean job's Ray Data stages, along the data flow: read → decode → caption → filter.

Each stage is a picklable callable over a pyarrow batch that returns a pyarrow batch with a
status for every row; none raises for a bad sample. A row that is not "ok" (an img2dataset
failure, a missing or undecodable image) passes through the model stages untouched and comes out
as a ledger row with its reason. Columns between stages:

    read     key shard shard_id shard_rows status error_message url web_text image(bytes)
    decode   ... image dropped, pixels_{S}: the decoded RGB image resized to S x S, raw uint8 bytes
    caption  ... + candidates (list<string>), captioner_id
    filter   the ledger's fields (`capfilt.ledger.LEDGER_SCHEMA`) + shard_id, shard_rows

Inputs (`read_input`, local or any fsspec URL): a webdataset tar with img2dataset's parquet
sidecar, or a parquet image table (one row per sample; `table_columns` says which columns count).

Images travel as raw resized pixels, not as PIL objects or re-encoded files: the model stages
need no decoder, and the pixels equal what `Captioner`/`Filter` would compute from the file (PIL's
resize to the size an image already has is a copy). D' is written from the input's original
bytes (`read_input` again), never from these.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from capfilt.curate import caption_samples, score_and_decide
from capfilt.data import text_of
from capfilt.decision import Rule
from capfilt.images import ImageError, open_image
from capfilt.ledger import LEDGER_SCHEMA, OK, failed_row, ok_row, table
from capfilt.model.generate import GenerationConfig

from .clean_inputs import READ_BATCH, read_input

log = logging.getLogger(__name__)

READ_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("shard_id", pa.int64()),
        ("shard_rows", pa.int64()),  # rows this shard yields in all: the driver knows when it is complete
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("url", pa.string()),
        ("web_text", pa.string()),
        ("image", pa.binary()),
    ]
)
OUT_SCHEMA = LEDGER_SCHEMA.append(pa.field("shard_id", pa.int64())).append(pa.field("shard_rows", pa.int64()))

# ── the read stage ──────────────────────────────────────────────────────────────────────────────


def read_shard(batch: pa.Table) -> Iterator[pa.Table]:
    """Stage 1 (CPU): one input shard (a row: shard_id, source) → one row per sample it accounts
    for (`read_input`): a tar's samples and its sidecar's failed ones, or a table's rows."""
    for item in batch.to_pylist():
        source, shard_id = item["source"], item["shard_id"]
        samples, _ = read_input(source)  # never raises: what cannot be read is the shard's read_error
        # Every string as Arrow can hold it: the readers' already are, but a path or a message
        # with a character UTF-8 cannot encode must not cost the shard its rows.
        rows = [
            {
                "key": text_of(s.key),
                "shard": text_of(source),
                "shard_id": shard_id,
                "shard_rows": len(samples),
                "status": text_of(s.status),
                "error_message": text_of(s.error_message),
                "url": text_of(s.url),
                "web_text": text_of(s.text),
                "image": s.image if s.status == OK else None,
            }
            for s in samples
        ]
        for start in range(0, len(rows), READ_BATCH):
            yield pa.Table.from_pylist(rows[start : start + READ_BATCH], schema=READ_SCHEMA)


def decode_batch(batch: pa.Table, sizes: list[int]) -> pa.Table:
    """Stage 2 (CPU): decode each ok row's image and resize it to every model size in `sizes`;
    a bad image sets the row's status to the ImageError reason instead of raising."""
    status = batch.column("status").to_pylist()
    messages = batch.column("error_message").to_pylist()
    pixels: dict[int, list[bytes | None]] = {s: [] for s in sizes}
    for i, data in enumerate(batch.column("image").to_pylist()):
        img, resized = None, dict.fromkeys(sizes)
        if status[i] == OK:
            key = batch.column("key")[i].as_py()
            try:
                img = open_image(data, name=key)
                resized = {
                    s: np.asarray(img.resize((s, s), Image.Resampling.BICUBIC), np.uint8) for s in sizes
                }
            except ImageError as err:  # PIL names the BytesIO's address: drop it, ledgers are reproducible
                status[i], messages[i] = err.reason, re.sub(r" at 0x[0-9a-fA-F]+", "", str(err))
            except Exception as err:  # one sample's image never stops the job: it is rejected with why
                status[i], messages[i] = (
                    "image_undecodable",
                    f"{key}: cannot be resized ({type(err).__name__}: {err})",
                )
                resized = dict.fromkeys(sizes)
        for s in sizes:
            pixels[s].append(resized[s].tobytes() if resized[s] is not None else None)
    out = batch.drop_columns(["image", "status", "error_message"])
    out = out.append_column("status", pa.array(status, pa.string()))
    out = out.append_column("error_message", pa.array(messages, pa.string()))
    for s in sizes:
        out = out.append_column(f"pixels_{s}", pa.array(pixels[s], pa.binary()))
    return out


def _images(batch: pa.Table, size: int, rows: list[int]) -> list[np.ndarray]:
    """The decoded pixels of `rows`, (size, size, 3) uint8 views of the column's bytes: the model
    stages stack them straight into their batch, no PIL round trip."""
    column = batch.column(f"pixels_{size}")
    return [np.frombuffer(column[i].as_py(), np.uint8).reshape(size, size, 3) for i in rows]


def _set_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


class CaptionStage:
    """Stage 3 (actor pool): K nucleus samples per ok image with the captioner, seeded per key."""

    def __init__(
        self,
        checkpoint: str,
        image_size: int,
        generation: dict[str, Any],
        seed: int,
        batch_size: int,
        device: str,
        num_cpus: float,
        precision: str = "exact",
    ) -> None:
        from capfilt.inference import Captioner

        _set_threads(num_cpus)
        self.captioner = Captioner(checkpoint, device=device, batch_size=batch_size, precision=precision)
        self.generation = GenerationConfig(**generation)
        self.size, self.seed = image_size, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = batch.column("status").to_pylist()
        ok = [i for i, s in enumerate(status) if s == OK]
        candidates: list[list[str]] = [[] for _ in status]
        if ok:
            keys = [batch.column("key")[i].as_py() for i in ok]
            images = _images(batch, self.size, ok)
            for i, texts in zip(
                ok, caption_samples(self.captioner, images, keys, self.generation, self.seed)
            ):
                candidates[i] = texts
        out = batch.append_column("candidates", pa.array(candidates, pa.list_(pa.string())))
        return out.append_column("captioner_id", pa.array([self.captioner.digest] * len(status), pa.string()))


class FilterStage:
    """Stage 4 (actor pool): ITM/ITC of the web text and every candidate with one image encoding,
    the decision rule, and the ledger row of every sample (ok or not)."""

    def __init__(
        self,
        checkpoint: str,
        image_size: int,
        threshold: float,
        seed: int,
        batch_size: int,
        device: str,
        num_cpus: float,
        precision: str = "exact",
    ) -> None:
        from capfilt.inference import Filter

        _set_threads(num_cpus)
        self.filter = Filter(checkpoint, device=device, batch_size=batch_size, precision=precision)
        self.rule = Rule(threshold=threshold)
        self.size, self.seed = image_size, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = {
            name: batch.column(name).to_pylist()
            for name in batch.column_names
            if not name.startswith("pixels_")
        }
        ok = [i for i, s in enumerate(cols["status"]) if s == OK]
        common = {"threshold": self.rule.threshold, "filter_id": self.filter.digest, "seed": self.seed}
        rows: list[dict[str, Any]] = []
        for i, status in enumerate(cols["status"]):
            if status != OK:
                rows.append(
                    failed_row(
                        cols["key"][i],
                        shard=cols["shard"][i],
                        status=status,
                        error_message=cols["error_message"][i],
                        web_text=cols["web_text"][i],
                        url=cols["url"][i],
                        captioner_id=cols["captioner_id"][i],
                        **common,
                    )
                )
            else:
                rows.append({})  # filled below, in the same order
        if ok:
            curated = score_and_decide(
                self.filter,
                _images(batch, self.size, ok),
                [cols["key"][i] for i in ok],
                [cols["web_text"][i] for i in ok],
                [cols["candidates"][i] for i in ok],
                self.rule,
            )
            for i, c in zip(ok, curated):
                rows[i] = ok_row(
                    c,
                    shard=cols["shard"][i],
                    url=cols["url"][i],
                    captioner_id=cols["captioner_id"][i],
                    **common,
                )
        for i, row in enumerate(rows):
            row.update(shard_id=cols["shard_id"][i], shard_rows=cols["shard_rows"][i])
        return table(rows, OUT_SCHEMA)
