"""The clean job's inputs, local or any fsspec URL: what a shard holds, read the same way by the
read stage, the D' writer and the report.

    samples, error = read_input("shards/00000.tar")          # webdataset tar + img2dataset sidecar
    samples, error = read_input("s3://bucket/table.parquet")  # parquet image table
    images = original_images(source, {"000000001"})           # original bytes by key

A webdataset tar is read with its img2dataset parquet sidecar (failed downloads become samples with
their status); a parquet image table holds one row per sample (`clean_tables` reads those). What cannot be read is reported per sample or per shard, never raised from a Ray task. In
either format a key met again is a DUPLICATE_KEY sample: the first with the key is the one cleaned.
"""

from __future__ import annotations

import io
import json
import logging
import lzma
import tarfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt.data import IMAGE_EXTENSIONS, PARQUET, input_format
from capfilt.data import _split_name as split_member_name
from capfilt.errors import CapfiltError
from capfilt.ledger import MISSING_IMAGE, OK

log = logging.getLogger(__name__)

READ_BATCH = 256  # rows per batch when reading a parquet table (and per block out of the read stage)
# statuses of samples with unusable keys: a key met again (tables and tars), a dotted one (tables)
DUPLICATE_KEY, INVALID_KEY = "duplicate_key", "invalid_key"
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class InputSample:
    """One sample as its input shard holds it, whatever the shard's format.

    `image` is the original encoded file, never re-encoded, when `status` is OK; otherwise `status`
    says why there is none (img2dataset's "failed_to_download"..., MISSING_IMAGE, a bad key) and
    `error_message` tells more."""

    key: str
    image: bytes | None
    text: str | None  # the web text; None when the sample has none
    url: str | None
    meta: dict[str, Any]  # the tar's .json, or the table row's scalar columns: carried into D'
    status: str = OK
    error_message: str | None = None
    ext_hint: str | None = None  # the tar member's, bytes column's or image file's extension

    @property
    def ext(self) -> str:
        """The extension D' stores the image under: the hint, else the format PIL recognises."""
        if self.ext_hint:
            return self.ext_hint
        try:
            return _PIL_EXT.get(Image.open(io.BytesIO(self.image or b"")).format or "", "jpg")
        except (OSError, ValueError):  # undecodable: never reaches D'
            return "jpg"


def read_input(source: str, keys: Collection[str] | None = None) -> tuple[list[InputSample], str | None]:
    """Every sample an input shard accounts for, with its original image bytes, and the read error
    that cut a tar short (what was read before it is kept), if any.

    `source` is a shard as `capfilt.data.input_files` names it (the ledger's `shard` column). With
    `keys`, only those samples (a table's image files are then read for those alone). Never raises:
    a shard that cannot be read at all gives no samples and the reason."""
    if input_format(source) == PARQUET:
        from .clean_tables import read_image_table  # tables build on InputSample, defined here

        return read_image_table(source, keys)
    return read_webdataset(source, keys)


def original_images(source: str, keys: Collection[str]) -> dict[str, bytes]:
    """The original image bytes of `keys` in one input shard of any format (`source` as the ledger's
    `shard` column names it), by key. A key without an image (failed download, missing file) is
    left out; an input that cannot be read at all gives {} (logged), never an error."""
    samples, error = read_input(source, set(keys))
    if error:
        log.warning("images from %s: %s", source, error)
    found: dict[str, bytes] = {}
    for s in samples:
        if s.status == OK and s.image is not None:
            found.setdefault(s.key, s.image)
    return found


# ── webdataset tars and their sidecars ──────────────────────────────────────────────────────────


@dataclass
class TarSample:
    """One sample of an input tar: its members by extension."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    cut: bool = False  # the read error struck while its members were read: some may be lost

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTENSIONS if e in self.files), None)

    @property
    def meta(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self.files.get("json", b"{}"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    @property
    def text(self) -> str | None:
        """The `.txt` member, else the .json's "caption" (webdataset / img2dataset convention)."""
        if "txt" in self.files:
            return self.files["txt"].decode("utf-8", errors="replace")
        caption = self.meta.get("caption")
        return caption if isinstance(caption, str) else None


def read_tar(path: str | Path) -> tuple[list[TarSample], str | None]:
    """The samples of a tar (a local path or URL), members grouped by key as `capfilt.data.read_tar`
    groups them (unsorted tars are fine), and the error that cut the read short, if any.

    A member whose key and extension were already met starts a new sample of that key;
    `read_webdataset` cleans the first and reports the others as DUPLICATE_KEY (webdataset itself
    yields them as more samples of the key, or refuses the tar). What was read before an error is
    kept; the sample of the last member read is marked `cut`, as its other members may be lost.
    tarfile stops without a word at a corrupt header in the middle of a tar or at a tar cut between
    members: the bytes after the last member tell (`_end_of_archive`)."""
    samples: list[TarSample] = []
    latest: dict[str, TarSample] = {}  # each key's last sample: a member joins it unless it repeats
    reading: TarSample | None = None
    error = None
    try:
        with fsspec.open(str(path), "rb") as f, _open_tar(f) as tar:
            for member in tar:
                key, ext = split_member_name(member.name)
                if not member.isfile() or not ext or key.rpartition("/")[2].startswith("_"):
                    continue  # webdataset skips names without an extension and "__" metadata
                short = key.rpartition("/")[2]
                reading = latest.get(short)
                if reading is None or ext in reading.files:
                    reading = latest[short] = TarSample(short)
                    samples.append(reading)
                handle = tar.extractfile(member)
                assert handle is not None
                reading.files[ext] = handle.read()
            error = _end_of_archive(tar)
    except (tarfile.TarError, OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, CapfiltError) as err:
        error = str(err)
    if error:
        error = f"cannot read shard {path}: {error}"
        if reading is not None:
            reading.cut = True
        log.warning("%s; keeping the %d samples read before it", error, len(samples))
    return samples, error


def _open_tar(f: Any) -> tarfile.TarFile:
    """A tar, plain or compressed, or tarfile.ReadError in one line (tarfile lists every method)."""
    try:
        return tarfile.open(fileobj=f, mode="r:*")
    except tarfile.ReadError as err:
        raise tarfile.ReadError("not a tar file (plain, gzip, bz2 or xz)") from err


def _end_of_archive(tar: tarfile.TarFile) -> str | None:
    """Why the bytes after the last member tarfile read are not the end of the tar, if they are not:
    a tar ends in two zero blocks; anything before them is a header tarfile could not read."""
    f = tar.fileobj
    assert f is not None
    f.seek(tar.offset)
    zeros = 0
    while chunk := f.read(1 << 16):
        rest = chunk.lstrip(b"\0")
        zeros += len(chunk) - len(rest)
        if rest and zeros >= 2 * tarfile.BLOCKSIZE:  # after a whole end-of-archive marker: not the tar's
            log.warning("ignoring data after the end of %s", tar.name)
            return None
        if rest:
            at = tar.offset + zeros
            return f"unreadable data at byte {at} (a corrupt member header): the members after it are lost"
    if zeros < tarfile.BLOCKSIZE:
        return f"no end-of-archive marker after byte {tar.offset}: the tar was cut short"
    return None


def read_sidecar(tar_path: str | Path) -> list[dict[str, Any]]:
    """img2dataset's parquet beside the tar (`00000.parquet`): one row per url; [] when absent."""
    path = str(tar_path).removesuffix(".tar") + ".parquet"
    try:
        with fsspec.open(path, "rb") as f:
            table = pq.ParquetFile(f)
            columns = [
                c
                for c in ("key", "status", "error_message", "caption", "url")
                if c in table.schema_arrow.names
            ]
            return table.read(columns=columns).to_pylist()
    except FileNotFoundError:
        return []
    except (pa.ArrowException, OSError, ValueError) as err:  # the tar's samples are still cleaned
        log.warning("ignoring unreadable sidecar %s: %s", path, err)
        return []


def read_webdataset(source: str, keys: Collection[str] | None = None) -> tuple[list[InputSample], str | None]:
    """A tar's samples, then its sidecar's failed or missing ones with img2dataset's status.

    The first sample of a key is the one cleaned; a later one of the same key becomes a
    DUPLICATE_KEY sample (left out when `keys` are asked for), as a repeated key of a table does.
    A sample the read error cut (`TarSample.cut`) is MISSING_IMAGE with that error."""
    tar, error = read_tar(source)
    out: list[InputSample] = []
    seen: set[str] = set()
    for s in tar:
        repeated = s.key in seen
        seen.add(s.key)
        if keys is not None and (s.key not in keys or repeated):
            continue
        ext, url = s.image_ext, s.meta.get("url")
        if repeated:
            status, message = DUPLICATE_KEY, f"key {s.key} is used by an earlier sample in {source}"
        elif s.cut:
            status, message = MISSING_IMAGE, error
        elif ext is None:
            status, message = MISSING_IMAGE, f"no image member for key {s.key} in {source}"
        else:
            status, message = OK, None
        out.append(
            InputSample(
                s.key,
                image=s.files[ext] if ext and status == OK else None,
                text=s.text,
                url=url if isinstance(url, str) else None,
                meta=s.meta,
                status=status,
                error_message=message,
                ext_hint=ext,
            )
        )
    for side in read_sidecar(source):
        key = side.get("key")
        if key is None or key in seen:
            continue
        seen.add(key)
        status = side.get("status") or MISSING_IMAGE
        message = side.get("error_message")
        if status == "success":  # listed as downloaded, but not in the tar
            status, message = MISSING_IMAGE, error or f"key {key} is in the sidecar but not in {source}"
        if keys is None or key in keys:
            out.append(InputSample(key, None, side.get("caption"), side.get("url"), {}, status, message))
    return out, error
