"""The clean job's Ray Data stages, along the data flow: read → decode (`clean_read`, no torch) →
caption → filter (here, the model actor pools).

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
from typing import Any

import numpy as np
import pyarrow as pa

from capfilt.curate import caption_samples, score_and_decide
from capfilt.decision import Rule
from capfilt.ledger import LEDGER_SCHEMA, OK, failed_row, ok_row, table
from capfilt.model.generate import GenerationConfig

log = logging.getLogger(__name__)

OUT_SCHEMA = LEDGER_SCHEMA.append(pa.field("shard_id", pa.int64())).append(pa.field("shard_rows", pa.int64()))


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
