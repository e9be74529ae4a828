"""Shards in img2dataset's webdataset layout, written byte-for-byte reproducibly.

Per shard `NNNNN`: `NNNNN.tar` (per sample `{key}.jpg`, `{key}.json`, `{key}.txt`, grouped by
key, members in the order webdataset's TarWriter uses), `NNNNN.parquet` (one row per sample, the
img2dataset columns) and `NNNNN_stats.json`. Nothing time- or host-dependent goes in: tar members
have mtime 0 and uid/gid 0, JSON keys are sorted, the stats' duration is 0.0.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: 00000.tar

SIDECAR_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


def sample_digits(shard_size: int) -> int:
    """Digits of the in-shard index in a key: 4 (img2dataset's default 10,000 per shard) or more."""
    return max(4, math.ceil(math.log10(shard_size)))


def sample_key(shard_id: int, index: int, shard_size: int) -> str:
    """img2dataset's key: shard id and index within the shard, zero-padded ("000010007")."""
    digits = sample_digits(shard_size)
    assert 0 <= index < 10**digits
    return f"{shard_id * 10**digits + index:0{SHARD_DIGITS + digits}d}"


@dataclass(frozen=True)
class Sample:
    """One image-text pair to write; `extra` adds fields to its .json (e.g. all reference captions)."""

    key: str
    jpg: bytes
    text: str
    url: str
    width: int
    height: int
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The sample's .json record: img2dataset's fields plus `extra`."""
        return {
            "caption": self.text,
            "url": self.url,
            "key": self.key,
            "status": "success",
            "error_message": None,
            "width": self.width,
            "height": self.height,
            "original_width": self.width,
            "original_height": self.height,
            "exif": None,
            "sha256": hashlib.sha256(self.jpg).hexdigest(),
            **self.extra,
        }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(directory: Path, shard_id: int, samples: list[Sample]) -> Path:
    """Write one shard's tar, parquet sidecar and stats into `directory`; returns the tar's path."""
    stem = f"{shard_id:0{SHARD_DIGITS}d}"
    metas = [s.meta() for s in samples]
    tar_path = directory / f"{stem}.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample, meta in zip(samples, metas):
            _add(tar, f"{sample.key}.jpg", sample.jpg)
            _add(tar, f"{sample.key}.json", json.dumps(meta, sort_keys=True, indent=4).encode())
            _add(tar, f"{sample.key}.txt", sample.text.encode())
    rows = [{name: meta[name] for name in SIDECAR_SCHEMA.names} for meta in metas]
    pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), directory / f"{stem}.parquet")
    stats = {
        "count": len(samples),
        "successes": len(samples),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": 0.0,
        "status_dict": {"success": len(samples)} if samples else {},
    }
    (directory / f"{stem}_stats.json").write_text(json.dumps(stats, sort_keys=True, indent=4) + "\n")
    return tar_path


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """A parquet file of `rows` with a fixed schema (same rows, same bytes)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
