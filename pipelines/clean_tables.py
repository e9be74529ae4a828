"""Parquet image tables as clean job inputs: which columns count (`table_columns`), and one
`InputSample` per row (`read_image_table`), the image from its bytes or from the file its path
names (confined to IMAGE_ROOTS_ENV's directories when set).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.data import IMAGE_EXTENSIONS, filesystem, text_of
from capfilt.errors import CapfiltError
from capfilt.images import MAX_IMAGE_BYTES
from capfilt.ledger import MISSING_IMAGE, OK

from .clean_inputs import (
    DUPLICATE_KEY,
    IMAGE_TOO_LARGE,
    INVALID_KEY,
    MAX_TEXT_BYTES,
    READ_BATCH,
    TEXT_TOO_LARGE,
    InputSample,
    decoded_rows,
    key_problem,
)

log = logging.getLogger(__name__)

# The most one column of one row group may declare decompressed. Reading a row group decompresses
# its column chunks whole (pyarrow peaked at 3x the declared size), and a compressed parquet can
# declare gigabytes of zeros in kilobytes: a row group over this, or over the per-row limits
# (MAX_IMAGE_BYTES, MAX_TEXT_BYTES) on average, is not read; its rows are rejected as too large.
ROW_GROUP_COLUMN_BYTES = 4 * 2**30

FETCH_THREADS = 16  # image files of a parquet table read at once (remote stores answer slowly)
# Parquet image tables: the first column present of each kind is used.
BYTES_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes")  # binary, or a struct with `bytes` (HF Image)
PATH_COLUMNS = ("image_path", "path", "file")  # relative paths are relative to the parquet's directory
# Set (os.pathsep-separated directories): a table's image paths are read only under these; URLs and
# paths outside them are refused per sample. The REST service sets it for the jobs it submits.
IMAGE_ROOTS_ENV = "CAPFILT_IMAGE_ROOTS"
TEXT_COLUMNS = ("caption", "text", "txt")


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


def plain_type(t: pa.DataType) -> pa.DataType:
    """The type a column is read as: a dictionary-encoded column (pandas categoricals) as its values,
    string and binary views (newer Arrow writers) as plain strings and bytes."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary_view(t):
        return pa.binary()
    return t


def plain_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with every column cast to its `plain_type`."""
    schema = pa.schema([f.with_type(plain_type(f.type)) for f in batch.schema])
    return batch if schema == batch.schema else batch.cast(schema)


def _string(t: pa.DataType) -> bool:
    t = plain_type(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def table_columns(schema: pa.Schema, source: str) -> TableColumns:
    """The columns of an image table, or CapfiltError naming the file, what it has and what counts.
    A text, url or status column of another type than text is refused by name, not passed over."""

    def first(names: tuple[str, ...], fits: Any) -> str | None:
        return next((n for n in names if n in schema.names and fits(plain_type(schema.field(n).type))), None)

    def struct_with_bytes(t: pa.DataType) -> bool:
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    def text_column(names: tuple[str, ...]) -> str | None:
        # Arrow's null type: a column pandas wrote with every value None (no text, no status...)
        found = first(names, lambda t: _string(t) or pa.types.is_null(t))
        present = [n for n in names if n in schema.names]
        if found is None and present:
            name = present[0]
            raise CapfiltError(
                f"{source}: column {name!r} is {schema.field(name).type}, but CapFilt reads it as text; "
                f"cast it to string (or rename it if it holds something else)"
            )
        return found

    binary = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
    image, kind = first(BYTES_COLUMNS, binary), "bytes"
    if image is None:
        image, kind = first(BYTES_COLUMNS, struct_with_bytes), "struct"
    if image is None:
        image, kind = first(PATH_COLUMNS, _string), "path"
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
        text_column(TEXT_COLUMNS),
        key="key" if "key" in schema.names else None,
        url=text_column(("url",)),
        status=text_column(("status",)),
        error_message=text_column(("error_message",)),
    )


def table_schema(source: str) -> pa.Schema:
    """A parquet's schema, from its footer; CapfiltError naming the file when it cannot be read."""
    try:
        with fsspec.open(source, "rb") as f:
            return pq.read_schema(f)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CapfiltError(f"{source}: not a readable parquet file ({err})") from err


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
                declared = _declared_too_large(table.metadata.row_group(group), cols, group)
                for batch in _row_group_batches(table, group, cols, declared):
                    batch, too_large = _without_oversize(plain_batch(batch), cols)
                    for i, row in enumerate(decoded_rows(batch)):
                        oversize = declared[:2] if declared else too_large.get(i)
                        sample, path = _table_sample(row, index, cols, stem, source, seen, oversize)
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
        for (sample, _), (data, status, message) in zip(to_fetch, fetched):
            if data is None:
                sample.status, sample.error_message = status, message
            sample.image = data
    return out, error


def _declared_too_large(
    meta: pq.RowGroupMetaData, cols: TableColumns, group: int
) -> tuple[str, str, str] | None:
    """(status, why, column) when a row group's footer declares more decompressed bytes in a column
    the job reads than its rows may hold (ROW_GROUP_COLUMN_BYTES, and twice MAX_IMAGE_BYTES or
    MAX_TEXT_BYTES a row on average, for the encoding's own bytes); None when it may be read."""
    sizes: dict[str, int] = {}
    for c in range(meta.num_columns):
        chunk = meta.column(c)
        top = chunk.path_in_schema.split(".")[0]
        sizes[top] = sizes.get(top, 0) + chunk.total_uncompressed_size
    rows = max(meta.num_rows, 1)
    texts = (cols.text, cols.key, cols.url, cols.status, cols.error_message)
    limits = [(cols.image, MAX_IMAGE_BYTES, IMAGE_TOO_LARGE)]
    limits += [(t, MAX_TEXT_BYTES, TEXT_TOO_LARGE) for t in texts if t]
    for name, per_row, status in limits:
        size = sizes.get(name, 0)
        if size > min(ROW_GROUP_COLUMN_BYTES, 2 * rows * per_row):  # 2: pages, dictionaries, offsets
            why = (
                f"its row group {group} declares {size} bytes of {name} for {meta.num_rows} rows, over "
                "what CapFilt reads (a compression bomb, or values over the limits); the row group was not read"
            )
            return status, why, name
    return None


def _row_group_batches(
    table: pq.ParquetFile, group: int, cols: TableColumns, declared: tuple[str, str, str] | None
) -> Iterator[pa.RecordBatch]:
    """The record batches of a row group; of one not to be read (`declared`), only its keys (unless
    the key column is the one over bounds), every other column null."""
    if declared is None:
        yield from table.iter_batches(batch_size=READ_BATCH, row_groups=[group])
        return
    schema = table.schema_arrow
    rows = table.metadata.row_group(group).num_rows
    if cols.key is not None and cols.key != declared[2]:
        keys = [b.column(cols.key) for b in table.iter_batches(row_groups=[group], columns=[cols.key])]
        key_values = pa.concat_arrays(keys) if keys else pa.nulls(0, schema.field(cols.key).type)
    else:
        key_values = None
    arrays = [
        key_values if key_values is not None and f.name == cols.key else pa.nulls(rows, f.type)
        for f in schema
    ]
    yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _without_oversize(
    batch: pa.RecordBatch, cols: TableColumns
) -> tuple[pa.RecordBatch, dict[int, tuple[str, str]]]:
    """`batch` with images over MAX_IMAGE_BYTES and texts over MAX_TEXT_BYTES replaced by nulls,
    judged by Arrow's lengths before any becomes a Python object (each copy of a 600 MB value
    counts), and for each such row its status and why."""
    found: dict[int, tuple[str, str]] = {}
    names = batch.schema.names

    def over(values: pa.Array, limit: int, status: str, what: str) -> pa.Array | None:
        if pa.types.is_null(values.type):  # a caption column pandas wrote with every value None
            return None
        lengths = pc.binary_length(values)
        too_big = pc.fill_null(pc.greater(lengths, limit), False)
        if not pc.any(too_big).as_py():
            return None
        for i in np.flatnonzero(too_big.to_numpy(zero_copy_only=False)):
            size = lengths[int(i)].as_py()
            kind = "a text" if status == TEXT_TOO_LARGE else "an image"
            found.setdefault(
                int(i), (status, f"its {what} is {size} bytes, over the {limit}-byte limit for {kind}")
            )
        return too_big

    columns = list(batch.columns)
    checks = []
    if cols.image_kind == "bytes":
        checks.append((cols.image, batch.column(cols.image), MAX_IMAGE_BYTES, IMAGE_TOO_LARGE, cols.image))
    elif cols.image_kind == "struct":
        image = batch.column(cols.image)
        checks.append(
            (cols.image, pc.struct_field(image, "bytes"), MAX_IMAGE_BYTES, IMAGE_TOO_LARGE, cols.image)
        )
    if cols.text:
        checks.append((cols.text, batch.column(cols.text), MAX_TEXT_BYTES, TEXT_TOO_LARGE, cols.text))
    for name, values, limit, status, what in checks:
        too_big = over(values, limit, status, what)
        if too_big is not None:
            j = names.index(name)
            columns[j] = pc.if_else(too_big, pa.nulls(len(batch), columns[j].type), columns[j])
    if not found:
        return batch, found
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema), found


def _table_sample(
    row: dict[str, Any],
    index: int,
    cols: TableColumns,
    stem: str,
    source: str,
    seen: set[str],
    too_large: tuple[str, str] | None = None,
) -> tuple[InputSample, str | None]:
    """A table row's sample, and the path of its image file still to read (None: nothing to read);
    `too_large`: the status and why of a row whose image or text `_without_oversize` dropped."""
    raw_key = text_of(row[cols.key]) if cols.key else None
    # A null key (or no key column) is named from the row; an empty one is a bad key, as in a tar.
    key = raw_key if raw_key is not None else f"{stem}_{index:09d}"
    value = row[cols.image]
    if cols.image_kind == "struct":  # Hugging Face's Image feature: the bytes, else the file
        data, path = (value.get("bytes"), value.get("path")) if value else (None, None)
    else:
        data, path = (value, None) if cols.image_kind == "bytes" else (None, value)
    suffix = posixpath.splitext(path or "")[1].lower()[1:]
    hint = suffix if data is None and suffix in IMAGE_EXTENSIONS else None
    hint = hint or (cols.image if cols.image in IMAGE_EXTENSIONS else None)
    given = row[cols.status] if cols.status else None
    text = text_of(row[cols.text]) if cols.text else None
    if key in seen:
        status, message = DUPLICATE_KEY, f"row {index}: key {key} is used by an earlier row"
    elif problem := key_problem(key):
        status, message = INVALID_KEY, f"row {index}: {problem}"
    elif given not in (None, "success"):  # img2dataset could not download or resize it
        status, message = given, row[cols.error_message] if cols.error_message else None
    elif too_large is not None:
        status, message = too_large[0], f"row {index} of {source}: {too_large[1]}"
    elif data is None and not path:
        status, message = MISSING_IMAGE, f"row {index} of {source} has no image ({cols.image} is null)"
    else:
        status, message = OK, None
    seen.add(key)
    meta = {k: v for k, v in row.items() if k != cols.image and isinstance(v, (str, int, float, bool))}
    url = text_of(row[cols.url]) if cols.url else None
    sample = InputSample(
        key,
        data if status == OK else None,
        None if status == TEXT_TOO_LARGE else text,
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


def _fetch(url: str) -> tuple[bytes | None, str, str | None]:
    """One image file's bytes, or the status and why it cannot be read: a sample's problem, never
    the job's. Only regular files up to MAX_IMAGE_BYTES are read (not a device, a pipe, a
    directory)."""
    try:
        fs, path = filesystem(url)
        info = fs.info(path)
        kind, size = info.get("type"), info.get("size")
        if kind not in (None, "file"):
            return None, MISSING_IMAGE, f"image path {url} is not a regular file (a {kind})"
        if size is not None and size > MAX_IMAGE_BYTES:
            return (
                None,
                IMAGE_TOO_LARGE,
                f"image file {url} is {size} bytes, over the {MAX_IMAGE_BYTES}-byte limit",
            )
        return fs.cat_file(path), OK, None
    except FileNotFoundError:
        return None, MISSING_IMAGE, f"image file not found: {url}"
    except Exception as err:  # any filesystem's error (network, permission, missing package) is per sample
        why = str(err) or type(err).__name__
        return None, MISSING_IMAGE, f"cannot read image file {url}: {why}"
