"""Image-text pairs from img2dataset webdataset shards, for training; where input shards are.

A shard is a tar holding, per sample, `{key}.jpg` (or png/webp), `{key}.txt` and `{key}.json`.
`iter_samples` groups members by key itself, so an unsorted tar (members of one sample apart)
is read correctly instead of being split into broken samples. `capfilt.pairs` holds the training
set in memory. No torch here: the cleaning job's read tasks and writers import this module.

Training takes what it can use: a sample without an image or a text is skipped and counted in
the log. The cleaning job does its own per-sample accounting and does not read through here; it
finds its inputs with `input_files`, which also takes parquet image tables and fsspec URLs.
"""

from __future__ import annotations

import glob
import json
import logging
import lzma
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.registry import known_implementations

from .errors import CapfiltError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif")
WEBDATASET, PARQUET = "webdataset", "parquet"  # the input formats of the cleaning job
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # webdataset shards, plain or compressed


def is_tar(name: str) -> bool:
    """Whether a file name is a tar shard's, in any case (`00000.TAR` too)."""
    return name.lower().endswith(TAR_SUFFIXES)


def is_parquet(name: str) -> bool:
    return name.lower().endswith(".parquet")


MAX_WORDS = 30  # BLIP's max_words for pre-training and caption fine-tuning
PathsLike = str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class Sample:
    """One webdataset sample: its key, the encoded image, the text and the .json record."""

    key: str
    image: bytes
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""


def shard_paths(paths: PathsLike) -> list[Path]:
    """Expand directories (their `*.tar`, sorted), glob patterns and tar paths into shard paths,
    each file once (a directory and a tar in it: its samples would be read twice, doubling them in
    training and making every text its own hard negative in retrieval).

    Raises CapfiltError naming an entry that matches no tar.
    """
    entries = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not entries:
        raise CapfiltError("no data given: pass shard directories, tar files or glob patterns")
    out: list[Path] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if is_tar(f.name) and f.is_file())
        elif p.is_file():
            found = [p]
        elif glob.has_magic(str(entry)):
            found = sorted(Path(m) for m in glob.glob(str(entry)) if is_tar(m))
        else:
            raise CapfiltError(f"data path not found: {entry}")
        if not found:
            raise CapfiltError(
                f"{entry} holds no tar shards (.tar, or compressed: .tar.gz, .tgz, .tar.bz2, .tar.xz; img2dataset's webdataset layout)"
            )
        out.extend(found)
    unique: list[Path] = []
    seen: set[Path] = set()
    for path in out:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    if len(unique) < len(out):
        log.warning(
            "%d shard(s) named more than once in %s: each is read once", len(out) - len(unique), entries
        )
    return unique


def input_format(source: str) -> str:
    """The input format of a shard: PARQUET (an image table) for a `.parquet` file, else WEBDATASET."""
    return PARQUET if is_parquet(source) else WEBDATASET


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a local path or URL and the path within it.

    Raises CapfiltError naming the package to install when the protocol's is missing."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:  # fsspec's message names the package ("Install s3fs to access S3")
        protocol = url.partition("://")[0]
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
        fix = f"pip install {package}" if package and package != "fsspec" else "install what it names"
        raise CapfiltError(f"{url}: reading {protocol}:// needs a missing package ({err}): {fix}") from err
    except ValueError as err:  # "Protocol not known: foo"
        raise CapfiltError(f"{url}: {err}") from err


def _source(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """How a found file is named from here on: local files by their resolved absolute path (the
    same whether given as a path, a glob or a file:// URL), others by their full URL."""
    if "file" in fs.protocol:
        return str(Path(path).resolve())
    return fs.unstrip_protocol(path)


def _is_glob(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether `path` is a pattern: it has glob characters and names nothing as it is (a directory
    `crawl[2024]` is that directory)."""
    if "http" in fs.protocol:  # a URL's "?" starts its query: only "*" makes an http glob
        return "*" in path
    return glob.has_magic(path) and not fs.exists(path)


def input_files(entries: Sequence[str]) -> list[str]:
    """Expand the cleaning job's inputs into shards: webdataset tars and parquet image tables.

    An entry is a local path or fsspec URL (s3://, gs://, http(s)://, file://, ...) of a file, a
    directory (its `*.tar`, or its `*.parquet` when it has no tar) or a glob (the tars and parquet
    files it matches). A parquet beside a tar of the same stem is img2dataset's sidecar of that tar,
    read with it, never an input. A file of another name is taken as a tar. Returns sources as
    `_source` names them, in order. Raises CapfiltError naming an entry that yields no shard.
    """
    if not entries:
        raise CapfiltError("no data given: pass shard directories, tar or parquet files, globs or URLs")
    out: list[str] = []
    for entry in entries:
        fs, path = filesystem(str(entry))
        try:
            if _is_glob(fs, path):
                matched = sorted(str(m) for m in fs.glob(path))
                found = [m for m in matched if is_tar(m)]
                found += [m for m in matched if is_parquet(m) and not _sidecar(fs, m, matched)]
                found.sort()
            elif is_tar(path) or is_parquet(path) or not fs.isdir(path):
                if not fs.exists(path):
                    raise CapfiltError(f"data path not found: {entry}")
                if is_parquet(path) and _sidecar(fs, path, []):
                    raise CapfiltError(
                        f"{entry} is img2dataset's sidecar of {path[: -len('.parquet')]}.tar, read "
                        "with that tar: give the tar (or its directory) instead"
                    )
                found = [path]
            else:
                listed = sorted(str(f["name"]) for f in fs.ls(path, detail=True) if f["type"] == "file")
                found = [f for f in listed if is_tar(f)] or [f for f in listed if is_parquet(f)]
                tables = [f for f in listed if is_parquet(f) and not _sidecar(fs, f, listed)]
                if tables and found and is_tar(found[0]):
                    log.warning(
                        "%s holds tar shards, which are its inputs, and %d parquet files that are no tar's "
                        "sidecar (%s...): they are not read; name them (or a glob) to clean them too",
                        entry,
                        len(tables),
                        tables[0],
                    )
        except CapfiltError:
            raise
        except (OSError, ValueError) as err:  # the filesystem's own: permissions, network, bad URL
            raise CapfiltError(f"cannot list or read {entry}: {err}") from err
        if not found:
            raise CapfiltError(
                f"{entry} holds no tar shards (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) or parquet image tables (the sidecars of tars are read "
                "with their tars)"
            )
        out.extend(_source(fs, f) for f in found)
    return out


def _sidecar(fs: fsspec.AbstractFileSystem, parquet: str, known: Sequence[str]) -> bool:
    """Whether `parquet` sits beside a tar of the same stem (img2dataset's sidecar of that tar)."""
    stem = parquet[: -len(".parquet")]
    tars = [stem + suffix for suffix in (*TAR_SUFFIXES, *(x.upper() for x in TAR_SUFFIXES))]
    return any(t in known for t in tars) or any(fs.exists(t) for t in tars)


def tar_stem(path: str) -> str:
    """A tar shard's path without its tar suffix: `00000.tar.gz` -> `00000` (its sidecar is
    `00000.parquet`)."""
    for suffix in sorted(TAR_SUFFIXES, key=len, reverse=True):
        if path.lower().endswith(suffix):
            return path[: -len(suffix)]
    return path


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


_METADATA_MEMBER = re.compile(r"__[^/]*__($|/)")


def skipped_member(name: str, ext: str) -> bool:
    """Whether webdataset skips a tar member: no extension, or its own `__...__` metadata. Other
    names starting with "_" (cameras name files `_DSC0001.JPG`) are samples like any other."""
    return not ext or bool(_METADATA_MEMBER.match(name))


def text_of(value: Any) -> str | None:
    """A value an input holds as text that Arrow and JSON can store: a str whose code points UTF-8
    cannot encode (a tar member name tarfile decoded with surrogate escapes, a lone surrogate a
    .json escaped) gets U+FFFD for them; bytes are decoded so; a number becomes its decimal
    string; anything else (None, lists, ...) is None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:  # tarfile's surrogate escapes of bytes that are not UTF-8: decode those bytes as U+FFFD
        return value.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
    except UnicodeEncodeError:  # other lone surrogates
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)


ANOTHER_ARCHIVE = "another tar archive starts"


def end_of_archive(tar: tarfile.TarFile) -> str | None:
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
            at = tar.offset + zeros
            if is_tar_header(chunk, len(chunk) - len(rest)):
                # webdataset stops here too; the samples of the second archive would vanish unseen.
                return (
                    f"{ANOTHER_ARCHIVE} at byte {at}, after the end-of-archive marker (tars joined "
                    "with cat?): its members are not read; join tars with `tar --concatenate` instead"
                )
            log.warning("ignoring data after the end of %s", tar.name)
            return None
        if rest:
            at = tar.offset + zeros
            return f"unreadable data at byte {at} (a corrupt member header): the members after it are lost"
    if zeros < tarfile.BLOCKSIZE:
        return f"no end-of-archive marker after byte {tar.offset}: the tar was cut short"
    return None


def is_tar_header(chunk: bytes, start: int) -> bool:
    """Whether the 512 bytes at `start` of `chunk` (block-aligned, or not: any offset) are a tar
    member header with a valid checksum."""
    block = chunk[start : start + tarfile.BLOCKSIZE]
    if len(block) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def read_tar(
    path: str | Path, fileobj: IO[bytes] | None = None
) -> tuple[dict[str, dict[str, bytes]], str | None]:
    """All members of a tar grouped by key (unsorted tars are fine), in order of each key's first
    member, and the error that cut the read short, if any: what was read before it is kept.
    `fileobj`: read the tar from this open (seekable) file instead, `path` only names it."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(None if fileobj else path, "r:*", fileobj=fileobj) as tar:
            for member in tar:
                if not (member.isfile() or member.islnk()):
                    continue
                key, ext = split_member_name(member.name)
                if skipped_member(member.name, ext):
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                groups.setdefault(key, {})[ext] = handle.read()
            # tarfile stops without a word at a cut between members or a corrupt header
            error = end_of_archive(tar)
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as err:
        return groups, f"cannot read shard {path}: {err}"
    return groups, f"cannot read shard {path}: {error}" if error else None


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples; a damaged tar gives those read before the damage (logged), not an error:
    one bad shard does not stop training on the others."""
    groups, error = read_tar(path)
    if error:
        log.warning("%s; going on with the %d samples read before it", error, len(groups))
    return groups


def iter_samples(paths: PathsLike) -> Iterator[Sample]:
    """Samples of every shard in order; a sample without image or text is skipped (logged).

    The text is the `.txt` member, else the .json's "caption"; an empty text is kept (it is
    what the web gave, and the filter's business).
    """
    skipped: Counter[str] = Counter()
    for shard in shard_paths(paths):
        for key, files in _read_shard(shard).items():
            meta: dict[str, Any] = {}
            if "json" in files:
                try:
                    loaded = json.loads(files["json"])
                    meta = loaded if isinstance(loaded, dict) else {}
                except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep or too long a number
                    skipped["bad_json"] += 1  # counted, but the pair itself is still usable
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if "txt" in files:
                text: str | None = files["txt"].decode("utf-8", errors="replace")
            else:
                caption = meta.get("caption")
                text = caption if isinstance(caption, str) else None
            if image is None:
                skipped["no_image"] += 1
                continue
            if text is None:
                skipped["no_text"] += 1
                continue
            yield Sample(key.rpartition("/")[2], image, text, meta, str(shard))
    if skipped:
        log.warning("skipped while reading %s: %s", paths, dict(skipped))


def sample_captions(sample: Sample, all_captions: bool = True) -> list[str]:
    """A sample's captions: every phrasing in its json "captions" (human-annotated data) when
    `all_captions`, else (or when there is no such list) its text alone."""
    captions = sample.meta.get("captions") if all_captions else None
    if isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions):
        return list(captions)
    return [sample.text]
