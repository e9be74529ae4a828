"""The clean job's inputs, local or any fsspec URL: what a shard holds, read the same way by the
read stage, the D' writer and the report.

    samples, error = read_input("shards/00000.tar")          # webdataset tar + img2dataset sidecar
    samples, error = read_input("s3://bucket/table.parquet")  # parquet image table
    images = original_images(source, {"000000001"})           # original bytes by key

A webdataset tar is read with its img2dataset parquet sidecar (failed downloads become samples with
their status); a parquet image table holds one row per sample (`table_columns` says which columns
count). What cannot be read is reported per sample or per shard, never raised from a Ray task. In
either format a key met again is a DUPLICATE_KEY sample: the first with the key is the one cleaned.
"""

from __future__ import annotations

import io
import json
import logging
import lzma
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt.data import IMAGE_EXTENSIONS, PARQUET, filesystem, input_format
from capfilt.data import _split_name as split_member_name
from capfilt.errors import CapfiltError
from capfilt.ledger import MISSING_IMAGE, OK

log = logging.getLogger(__name__)

READ_BATCH = 256  # rows per batch when reading a parquet table (and per block out of the read stage)
FETCH_THREADS = 16  # image files of a parquet table read at once (remote stores answer slowly)
# Parquet image tables: the first column present of each kind is used.
BYTES_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes")  # binary, or a struct with `bytes` (HF Image)
PATH_COLUMNS = ("image_path", "path", "file")  # relative paths are relative to the parquet's directory
# Set (os.pathsep-separated directories): a table's image paths are read only under these; URLs and
# paths outside them are refused per sample. The REST service sets it for the jobs it submits.
IMAGE_ROOTS_ENV = "CAPFILT_IMAGE_ROOTS"
TEXT_COLUMNS = ("caption", "text", "txt")
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


# ── parquet image tables ────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class TableColumns:
    """Which columns of a parquet image table hold what; None: the table has no such column."""

    image: str
    image_kind: str  # "bytes", "struct" (a `bytes` field, and maybe `path`) or "path"
    text: str | None  # None: images alone (the captioner still writes synthetic texts for them)
    key: str | None
    url: str | None
    status: str | None  # img2dataset's status and error_message (parquet output format)
    error_message: str | None


def table_columns(schema: pa.Schema, source: str) -> TableColumns:
    """The columns of an image table, or CapfiltError naming the file, what it has and what counts."""

    def first(names: tuple[str, ...], fits: Any) -> str | None:
        return next((n for n in names if n in schema.names and fits(schema.field(n).type)), None)

    def struct_with_bytes(t: pa.DataType) -> bool:
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    binary = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
    string = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    image, kind = first(BYTES_COLUMNS, binary), "bytes"
    if image is None:
        image, kind = first(BYTES_COLUMNS, struct_with_bytes), "struct"
    if image is None:
        image, kind = first(PATH_COLUMNS, string), "path"
    text = first(TEXT_COLUMNS, string)
    if image is None:
        found = ", ".join(f"{f.name} ({f.type})" for f in schema) or "none"
        raise CapfiltError(
            f"{source} is neither an image table nor an img2dataset sidecar beside its tar: it has "
            f"columns {found}; an image table needs image bytes ({', '.join(BYTES_COLUMNS)}: binary, or a "
            f"struct with a `bytes` field) or an image path ({', '.join(PATH_COLUMNS)}: string); "
            f"optional: a text ({', '.join(TEXT_COLUMNS)}: string), key, url, status, error_message"
        )
    return TableColumns(
        image,
        kind,
        text,
        key="key" if "key" in schema.names else None,
        url=first(("url",), string),
        status=first(("status",), string),
        error_message=first(("error_message",), string),
    )


def table_schema(source: str) -> pa.Schema:
    """A parquet's schema, from its footer; CapfiltError naming the file when it cannot be read."""
    try:
        with fsspec.open(source, "rb") as f:
            return pq.read_schema(f)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CapfiltError(f"{source}: not a readable parquet file ({err})") from err


def image_table_columns(source: str) -> TableColumns:
    """Read a parquet's footer and check that it is an image table (`table_columns`)."""
    return table_columns(table_schema(source), source)


def read_image_table(
    source: str, keys: Collection[str] | None = None
) -> tuple[list[InputSample], str | None]:
    """One sample per row of a parquet image table: the image from its bytes or the file its path
    names, the key from `key` (else `{file stem}_{row index}`), img2dataset's status if given; and
    the error that cut the read short, if any (the rows read before it are kept, as in a tar).

    A row without an image or with an unreadable image file gets MISSING_IMAGE and a message; a
    key already used earlier in the table DUPLICATE_KEY, a key with a "." (webdataset would read
    the rest as an extension) INVALID_KEY. Text that is not UTF-8 is read with U+FFFD in place of
    the bad bytes. A file that is no image table, or no parquet, gives no samples and the reason."""
    stem = re.sub(r"[^0-9A-Za-z_-]", "_", posixpath.basename(source).removesuffix(".parquet"))
    base = posixpath.dirname(source)
    out: list[InputSample] = []
    to_fetch: list[tuple[InputSample, str]] = []
    seen: set[str] = set()
    error, index, rows = None, 0, None
    try:
        with fsspec.open(source, "rb") as f:
            table = pq.ParquetFile(f)
            rows = table.metadata.num_rows
            cols = table_columns(table.schema_arrow, source)
            for group in range(table.num_row_groups):  # by row group: damage in one keeps the ones before
                for batch in table.iter_batches(batch_size=READ_BATCH, row_groups=[group]):
                    for row in _rows(batch):
                        sample, path = _table_sample(row, index, cols, stem, source, seen)
                        index += 1
                        if keys is not None and (sample.key not in keys or sample.status == DUPLICATE_KEY):
                            continue
                        out.append(sample)
                        if path is not None:
                            url = _resolve(path, base)
                            refused = _outside_image_roots(url)
                            if refused:
                                sample.status, sample.error_message = MISSING_IMAGE, refused
                            else:
                                to_fetch.append((sample, url))
    except CapfiltError as err:
        error = str(err)
    except Exception as err:  # pyarrow's, fsspec's or a filesystem's: this shard's problem, not the job's
        error = f"cannot read image table {source}: {err}"
        if rows is not None and index < rows:
            error += f" (rows {index} to {rows - 1} of {rows} are lost)"
    if error:
        log.warning("%s; keeping the %d rows read before it", error, index)
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        fetched = pool.map(_fetch, [url for _, url in to_fetch])
        for (sample, _), (data, message) in zip(to_fetch, fetched):
            if data is None:
                sample.status, sample.error_message = MISSING_IMAGE, message
            sample.image = data
    return out, error


def _rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """A batch's rows as dicts; strings that are not valid UTF-8 (web text often is not) get U+FFFD
    for their bad bytes instead of failing the whole batch."""
    strings = [f.name for f in batch.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    table = pa.Table.from_batches([batch])
    for name in strings:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table.column(i).cast(pa.large_binary()))
    rows = table.to_pylist()
    for row in rows:
        for name in strings:
            if row[name] is not None:
                row[name] = row[name].decode("utf-8", errors="replace")
    return rows


def _table_sample(
    row: dict[str, Any], index: int, cols: TableColumns, stem: str, source: str, seen: set[str]
) -> tuple[InputSample, str | None]:
    """A table row's sample, and the path of its image file still to read (None: nothing to read)."""
    raw_key = row[cols.key] if cols.key else None
    key = str(raw_key) if raw_key not in (None, "") else f"{stem}_{index:09d}"
    value = row[cols.image]
    if cols.image_kind == "struct":  # Hugging Face's Image feature: the bytes, else the file
        data, path = (value.get("bytes"), value.get("path")) if value else (None, None)
    else:
        data, path = (value, None) if cols.image_kind == "bytes" else (None, value)
    suffix = posixpath.splitext(path or "")[1].lower()[1:]
    hint = suffix if data is None and suffix in IMAGE_EXTENSIONS else None
    hint = hint or (cols.image if cols.image in IMAGE_EXTENSIONS else None)
    given = row[cols.status] if cols.status else None
    if key in seen:
        status, message = DUPLICATE_KEY, f"row {index}: key {key} is used by an earlier row"
    elif "." in key:
        status, message = INVALID_KEY, f"row {index}: key {key!r} has a '.', read as an extension in D'"
    elif given not in (None, "success"):  # img2dataset could not download or resize it
        status, message = given, row[cols.error_message] if cols.error_message else None
    elif data is None and not path:
        status, message = MISSING_IMAGE, f"row {index} of {source} has no image ({cols.image} is null)"
    else:
        status, message = OK, None
    seen.add(key)
    meta = {k: v for k, v in row.items() if k != cols.image and isinstance(v, (str, int, float, bool))}
    url = row[cols.url] if cols.url else None
    sample = InputSample(
        key,
        data if status == OK else None,
        row[cols.text] if cols.text else None,
        url,
        meta,
        status,
        message,
        hint,
    )
    return sample, (path if status == OK and data is None else None)


def image_roots() -> list[Path]:
    """The directories a table's image paths must lie under (IMAGE_ROOTS_ENV, os.pathsep-separated);
    [] when it is unset: any path or URL a table names is read."""
    value = os.environ.get(IMAGE_ROOTS_ENV, "")
    return [Path(r).resolve() for r in value.split(os.pathsep) if r]


def _outside_image_roots(url: str) -> str | None:
    """Why a table's image path may not be read under the image roots, or None when it may."""
    roots = image_roots()
    if not roots:
        return None
    if "://" in url and not url.startswith("file://"):
        return f"image path {url}: only local files under the allowed roots are read"
    resolved = Path(url.removeprefix("file://")).resolve()
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        return f"image path {url} resolves to {resolved}, outside the allowed roots ({allowed})"
    return None


def _resolve(path: str, base: str) -> str:
    """An image path of a table: relative ones against the table's directory, others as they are."""
    return path if "://" in path or path.startswith("/") else posixpath.join(base, path)


def _fetch(url: str) -> tuple[bytes | None, str | None]:
    """One image file's bytes, or why it cannot be read: a sample's problem, never the job's."""
    try:
        fs, path = filesystem(url)
        return fs.cat_file(path), None
    except FileNotFoundError:
        return None, f"image file not found: {url}"
    except Exception as err:  # any filesystem's error (network, permission, missing package) is per sample
        return None, f"cannot read image file {url}: {err}"
