"""The clean job's CPU stages, read → decode (`clean_stages` has the model stages after them).

Ray workers run these as tasks; this module and what it imports need no torch and no model code,
so a worker that reads and decodes does not load them (about 0.5 GB of memory and seconds of start
for each such worker).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from capfilt.data import text_of
from capfilt.images import ImageError, open_image
from capfilt.ledger import OK

from .clean_inputs import READ_BATCH, read_input

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
