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

import functools
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

from capfilt.data import (
    ANOTHER_ARCHIVE,
    IMAGE_EXTENSIONS,
    PARQUET,
    end_of_archive,
    input_format,
    skipped_member,
    split_member_name,
    tar_stem,
    text_of,
)
from capfilt.errors import CapfiltError
from capfilt.images import MAX_IMAGE_BYTES
from capfilt.ledger import MISSING_IMAGE, OK

log = logging.getLogger(__name__)

READ_BATCH = 256  # rows per batch when reading a parquet table (and per block out of the read stage)
# statuses of samples with unusable keys: a key met again (tables and tars), a dotted one (tables)
DUPLICATE_KEY, INVALID_KEY = "duplicate_key", "invalid_key"
IMAGE_TOO_LARGE = "image_too_large"  # `capfilt.images.ImageError`'s reason for decompression bombs, too
# A web text (a tar's .txt, a table's caption) above this many bytes is no alt-text: the sample is
# TEXT_TOO_LARGE, and the text goes nowhere (every stage, the ledger and D' would hold it). A .json
# above it is not read (as if there were none). The filter reads a text's first 35 tokens or so.
MAX_TEXT_BYTES = 2**20
TEXT_TOO_LARGE = "text_too_large"
TEXT_EXTENSIONS = ("txt", "json")  # the members besides the image that the job reads
_PIL_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "AVIF": "avif",
}


def key_problem(key: str) -> str | None:
    """Why a sample's key cannot name its pairs in D' (a tar's members `{key}.jpg`...), or None.
    A "." would be read back as the start of the extension, a "/" as a directory (an absolute or
    `../` path when it leads), a NUL ends a tar member name."""
    if not key:
        return "empty key"
    for char, why in (
        (".", "read as an extension in D'"),
        ("/", "a path in D'"),
        ("\0", "not allowed in a tar"),
    ):
        if char in key:
            return f"key {key!r} has a {char!r}, {why}"
    return None


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
    try:
        if input_format(source) == PARQUET:
            from .clean_tables import read_image_table  # tables build on InputSample, defined here

            return read_image_table(source, keys)
        return read_webdataset(source, keys)
    except Exception as err:  # a reader's bug or a case no reader foresaw: this shard's, never the job's
        log.exception("reading %s", source)
        return [], f"cannot read shard {source}: {type(err).__name__}: {err}"


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
    too_large: dict[str, int] = field(default_factory=dict)  # image and text members not read: their sizes
    unreadable: dict[str, str] = field(default_factory=dict)  # members that could not be read: why

    def has(self, ext: str) -> bool:
        """Whether a member of extension `ext` is in this sample already (read or not)."""
        return ext in self.files or ext in self.too_large or ext in self.unreadable

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTENSIONS if e in self.files), None)

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        """The `.json` member as a dict; {} when there is none or it is no JSON object (not UTF-8,
        nested too deep, a number too long to convert: a sample's problem, never the shard's)."""
        try:
            loaded = json.loads(self.files.get("json", b"{}"))
        except (ValueError, RecursionError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    @property
    def text(self) -> str | None:
        """The `.txt` member, else the .json's "caption" (webdataset / img2dataset convention)."""
        if "txt" in self.too_large:
            return None
        if "txt" in self.files:
            return self.files["txt"].decode("utf-8", errors="replace")
        caption = self.meta.get("caption")
        return text_of(caption) if isinstance(caption, str) else None

    @property
    def url(self) -> str | None:
        url = self.meta.get("url")
        return text_of(url) if isinstance(url, str) else None

    def missing_image(self, source: str) -> str:
        """Why this sample has no image member, naming what it has."""
        dotted = [e for e in self.files if "." in e and e.rpartition(".")[2] in IMAGE_EXTENSIONS]
        if dotted:  # `img.v2.jpg`: webdataset's key ends at the first dot, so the extension is "v2.jpg"
            return (
                f"no image member for key {self.key} in {source}: {self.key}.{dotted[0]} has the "
                f"extension {dotted[0]!r} (a key ends at the first '.' of a member name); rename it "
                f"without the extra dot"
            )
        broken = "".join(f"; {why}" for e, why in self.unreadable.items() if e in IMAGE_EXTENSIONS)
        return (
            f"no image member for key {self.key} in {source} (it has: {', '.join(sorted(self.files)) or 'nothing'})"
            + broken
        )


def read_tar(path: str | Path) -> tuple[list[TarSample], str | None]:
    """The samples of a tar (a local path or URL), members grouped by key as `capfilt.data.read_tar`
    groups them (unsorted tars are fine), and the error that cut the read short, if any.

    A member joins the first sample of its key that has no member of its extension yet, else
    starts a new sample of that key;
    `read_webdataset` cleans the first and reports the others as DUPLICATE_KEY (webdataset itself
    yields them as more samples of the key, or refuses the tar). What was read before an error is
    kept; the sample of the last member read is marked `cut`, as its other members may be lost.
    tarfile stops without a word at a corrupt header in the middle of a tar or at a tar cut between
    members: the bytes after the last member tell (`capfilt.data.end_of_archive`)."""
    samples: list[TarSample] = []
    by_key: dict[str, list[TarSample]] = {}  # each key's samples, in the tar's order
    reading: TarSample | None = None
    error, whole = None, False
    try:
        with fsspec.open(str(path), "rb") as f, _open_tar(f) as tar:
            for member in tar:
                key, ext = split_member_name(member.name)
                if not (member.isfile() or member.islnk() or member.issym()) or skipped_member(
                    member.name, ext
                ):
                    continue  # hard links are read as their target's bytes
                short = text_of(key.rpartition("/")[2]) or ""  # names that are not UTF-8 get U+FFFD
                # the key's first sample still lacking this extension: `k.jpg k.jpg k.txt` gives the
                # text to the first sample, the one cleaned, not to the duplicate
                of_key = by_key.setdefault(short, [])
                reading = next((t for t in of_key if not t.has(ext)), None)
                if reading is None:
                    reading = TarSample(short)
                    of_key.append(reading)
                    samples.append(reading)
                if member.issym():  # a sample all of symbolic links still has its ledger row
                    reading.unreadable[ext] = (
                        f"{member.name} is a symbolic link (to {member.linkname!r}), which is not followed"
                    )
                    continue
                limit = MAX_IMAGE_BYTES if ext in IMAGE_EXTENSIONS else MAX_TEXT_BYTES
                if ext not in IMAGE_EXTENSIONS and ext not in TEXT_EXTENSIONS:
                    reading.files[ext] = b""  # not used (a .cls, an .npy...): listed, never read
                elif member.size > limit:
                    reading.too_large[ext] = member.size
                    if ext != "json":  # a .json too large is as if there were none
                        reading.files[ext] = b""
                elif (data := _member_bytes(tar, member)) is None:
                    reading.unreadable[ext] = (
                        f"{member.name} is a hard link to {member.linkname!r}, which is no file read "
                        "before it in the tar"
                    )
                else:
                    reading.files[ext] = data
            error = end_of_archive(tar)
            whole = error is not None and error.startswith(ANOTHER_ARCHIVE)  # the first archive ended
    except (tarfile.TarError, OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, CapfiltError) as err:
        error, whole = str(err), False
    if error:
        error = f"cannot read shard {path}: {error}"
        if reading is not None and not whole:
            reading.cut = True
        log.warning("%s; keeping the %d samples read before it", error, len(samples))
    return samples, error


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    """A file member's bytes; None for a hard link whose target tarfile cannot give (not in the
    tar, later in it, itself, a directory): that member's problem, not the shard's."""
    try:
        handle = tar.extractfile(member)  # KeyError: "linkname ... not found"
    except (KeyError, tarfile.StreamError):
        return None
    return None if handle is None else handle.read()  # None: the link's target is no file


def _open_tar(f: Any) -> tarfile.TarFile:
    """A tar, plain or compressed, or tarfile.ReadError in one line (tarfile lists every method)."""
    try:
        return tarfile.open(fileobj=f, mode="r:*")
    except tarfile.ReadError as err:
        raise tarfile.ReadError("not a tar file (plain, gzip, bz2 or xz)") from err


SIDECAR_COLUMNS = ("key", "status", "error_message", "caption", "url")


def read_sidecar(tar_path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """img2dataset's parquet beside the tar (`00000.parquet`): one row per url, its values as text
    (`text_of`: strings that are not UTF-8 get U+FFFD, numbers become strings), and why it could
    not be read whole, if so. No sidecar: ([], None). The rows read before an error are kept."""
    path = tar_stem(str(tar_path)) + ".parquet"
    rows: list[dict[str, Any]] = []
    try:
        with fsspec.open(path, "rb") as f:
            table = pq.ParquetFile(f)
            columns = [c for c in SIDECAR_COLUMNS if c in table.schema_arrow.names]
            for batch in table.iter_batches(batch_size=READ_BATCH, columns=columns):
                for row in decoded_rows(batch):
                    rows.append({c: text_of(row.get(c)) for c in columns})
    except FileNotFoundError:
        return [], None
    except Exception as err:  # pyarrow's, fsspec's, a filesystem's: the tar's samples are still cleaned
        return rows, (
            f"cannot read the sidecar {path} ({err}): the failed downloads it lists after row "
            f"{len(rows)} are not accounted for"
        )
    return rows, None


def decoded_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
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


def read_webdataset(source: str, keys: Collection[str] | None = None) -> tuple[list[InputSample], str | None]:
    """A tar's samples, then its sidecar's failed or missing ones with img2dataset's status.

    The first sample of a key is the one cleaned; a later one of the same key becomes a
    DUPLICATE_KEY sample (left out when `keys` are asked for), as a repeated key of a table does.
    A sample the read error cut (`TarSample.cut`) is MISSING_IMAGE with that error."""
    tar, error = read_tar(source)
    out: list[InputSample] = []
    seen: set[str] = set()
    # A key with dots (`a.b`, members `a.b.jpg`): webdataset's key ends at the first dot, so the tar
    # holds it as key `a` with members `b.jpg`; its sidecar row `a.b` is that sample, not another.
    dotted = {
        f"{s.key}.{e.rpartition('.')[0]}"
        for s in tar
        for e in (*s.files, *s.too_large, *s.unreadable)
        if "." in e
    }
    for s in tar:
        repeated = s.key in seen
        seen.add(s.key)
        if keys is not None and (s.key not in keys or repeated):
            continue
        ext = s.image_ext
        if repeated:
            status, message = DUPLICATE_KEY, f"key {s.key} is used by an earlier sample in {source}"
        elif problem := key_problem(s.key):
            status, message = INVALID_KEY, f"{problem} in {source}"
        elif s.cut:
            status, message = MISSING_IMAGE, error
        elif ext is None:
            status, message = MISSING_IMAGE, s.missing_image(source)
        elif ext in s.too_large:
            status = IMAGE_TOO_LARGE
            message = f"{s.key}.{ext} in {source} is {s.too_large[ext]} bytes, over the {MAX_IMAGE_BYTES}-byte limit"
        elif "txt" in s.too_large:
            status = TEXT_TOO_LARGE
            message = f"{s.key}.txt in {source} is {s.too_large['txt']} bytes, over the {MAX_TEXT_BYTES}-byte limit for a text"
        else:
            status, message = OK, None
        out.append(
            InputSample(
                s.key,
                image=s.files[ext] if ext and status == OK else None,
                text=s.text,
                url=s.url,
                meta=s.meta,
                status=status,
                error_message=message,
                ext_hint=ext,
            )
        )
    sidecar, sidecar_error = read_sidecar(source)
    for side in sidecar:
        key = side.get("key")
        if key is None or key in seen or key in dotted:
            continue
        seen.add(key)
        status = side.get("status") or MISSING_IMAGE
        message = side.get("error_message")
        if status == "success":  # listed as downloaded, but not in the tar
            status, message = MISSING_IMAGE, error or f"key {key} is in the sidecar but not in {source}"
        if keys is None or key in keys:
            out.append(InputSample(key, None, side.get("caption"), side.get("url"), {}, status, message))
    if sidecar_error:
        log.warning("%s", sidecar_error)
        error = f"{error}; {sidecar_error}" if error else sidecar_error
    return out, error
