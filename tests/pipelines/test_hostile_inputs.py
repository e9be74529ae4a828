"""Hostile inputs through the real clean job (local Ray, tiny checkpoints): odd but valid images are
cleaned, broken ones get a decode reason, damaged and empty tars are reported per shard without
stopping the job, and every sample of the input has exactly one ledger row.

The inputs are img2dataset webdataset shards (tar + parquet sidecar) made here, no downloads:

    00000  valid but odd images: CMYK, 16-bit, palette with alpha, animated GIF, WebP, EXIF-rotated,
           grayscale, 1x4000 and 4000x1
    00001  odd texts: bytes that are not UTF-8, 100,000 characters, control characters, no .txt
           (the .json's caption), no .txt and no caption, no .json
    00002  broken images: cut-off JPEG, zero bytes, an HTML page saved as .jpg, a PNG bomb that
           decompresses to 144 M pixels, a PNG header declaring 10^10 pixels; a key twice
    00003  a tar with garbage over a member header in the middle
    00004  a tar cut off in the middle of a member
    00005  a tar with no members (and an empty sidecar)
    00006  an HTML error page saved as the tar (its sidecar lists two samples)
    00007  odd members: a camera's `_DSC0001` key, a name that is not UTF-8, .json files holding a
           5,000-digit number, 100,000 nested lists and an escaped lone surrogate, a hard link,
           a dotted name (`img.v2.jpg`)
    00008  a tar whose sidecar is cut short (the failed downloads it lists are lost: a read error)
    tables/keys.parquet   keys D' cannot hold ("/abs", "a/b", a NUL) and `x_s0` beside `x`, whose
                          synthetic pair is `x_s0` too; the caption column dictionary-encoded
    tables/paths.parquet  image paths that are no regular file: /dev/zero, a FIFO
    human/                a human shard with a 0-byte image, an HTML page, a blank text, one good pair

Rules the test pins down (docs/reliability.md lists them): a key met again in a tar is a second
sample with status `duplicate_key` (the first is cleaned, as in parquet tables); when a read error
stops a tar, the samples read before it are cleaned except the last one (its other members may be
lost), and every sample after it that the sidecar lists is `missing_image` with the error; the
shard's stats and the summary carry the error. A parquet table without an image and a text column
stops the job before any work, even among good inputs.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.decision import REASONS
from capfilt.errors import CapfiltError
from capfilt.ledger import read_ledger
from capfilt.pipelines.clean import CleanConfig, CleanSummary, clean
from capfilt.world.writer import SIDECAR_SCHEMA

DECODE_REASONS = {"image_undecodable", "image_empty", "image_too_large"}
BOMB_SIDE = 12_000  # 144 M pixels: over PIL's limit (89 M) and ours (64 M); the file is 140 kB


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A grayscale PNG of zeros declaring `width` x `height`, with `rows` rows of data (all)."""
    squeeze = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(squeeze.compress(row) for _ in range(height if rows is None else rows)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _odd_images() -> dict[str, tuple[str, bytes]]:
    """key -> (member extension, bytes) of images PIL reads but a naive RGB decode would not."""
    rgb = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8))
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    sixteen = Image.fromarray((np.arange(24 * 40).reshape(24, 40) * 60).astype(np.uint16))
    assert sixteen.mode.startswith("I;16")
    palette = Image.new("RGBA", (12, 12), (0, 0, 255, 0)).convert("P")
    return {
        "cmyk_jpeg": ("jpg", _encode(rgb.convert("CMYK"), "JPEG")),
        "png_16bit": ("png", _encode(sixteen, "PNG")),
        "palette_alpha_png": ("png", _encode(palette, "PNG")),
        # img2dataset keeps an original file's bytes under the dataset's extension
        "animated_gif": ("jpg", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0)),
        "webp": ("webp", _encode(rgb, "WEBP")),
        "exif_rotated_jpeg": ("jpg", _encode(rgb, "JPEG", exif=exif.tobytes())),
        "grayscale_jpeg": ("jpg", _encode(rgb.convert("L"), "JPEG")),
        "tall_1x4000": ("png", _encode(Image.new("RGB", (1, 4000), (200, 30, 30)), "PNG")),
        "wide_4000x1": ("png", _encode(Image.new("RGB", (4000, 1), (30, 200, 30)), "PNG")),
    }


def _jpeg(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


def _write(directory: Path, shard_id: int, members: list[tuple[str, bytes]], keys: list[str]) -> Path:
    """A tar of `members` (name, bytes) in this order and its img2dataset sidecar listing `keys`."""
    tar_path = directory / f"{shard_id:05d}.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = [
        {"url": f"http://example.com/{k}", "caption": f"caption of {k}", "key": k, "status": "success"}
        for k in keys
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), directory / f"{shard_id:05d}.parquet")
    return tar_path


def _sample(
    key: str, ext: str, image: bytes, text: str | bytes | None = "a picture"
) -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image)]
    meta = {"key": key, "url": f"http://example.com/{key}", "status": "success"}
    members.append((f"{key}.json", json.dumps(meta).encode()))
    if text is not None:
        members.append((f"{key}.txt", text if isinstance(text, bytes) else text.encode()))
    return members


LONG_TEXT = "a red circle " * 7692 + "end"  # 100,000 characters
CONTROL_TEXT = "a\x00red\x1b[31m circle\x07 on\r\n\tblue\x7f\u202egreen\ufeff"
NON_UTF8 = b"caf\xe9 \xff\xfe on a red \x80circle"


def build_inputs(directory: Path) -> dict[str, list[str]]:
    """Write the shards of the module docstring; returns the statuses each key's samples must get,
    in input order ("ok" for a cleaned sample)."""
    expected: dict[str, list[str]] = {}

    def add(key: str, *statuses: str) -> None:
        expected.setdefault(key, []).extend(statuses)

    odd = _odd_images()
    _write(directory, 0, [m for k, (ext, data) in odd.items() for m in _sample(k, ext, data)], list(odd))
    for key in odd:
        add(key, "ok")

    image = _jpeg(1)
    texts = [
        *_sample("non_utf8_text", "jpg", image, NON_UTF8),
        *_sample("long_text", "jpg", image, LONG_TEXT),
        *_sample("control_char_text", "jpg", image, CONTROL_TEXT),
        ("no_txt.jpg", image),
        ("no_txt.json", json.dumps({"caption": "the caption from the json"}).encode()),
        ("no_txt_no_caption.jpg", image),
        ("no_txt_no_caption.json", json.dumps({"url": "http://example.com/x"}).encode()),
        ("no_json.jpg", image),
        ("no_json.txt", b"a text without a json"),
    ]
    text_keys = ["non_utf8_text", "long_text", "control_char_text", "no_txt", "no_txt_no_caption", "no_json"]
    _write(directory, 1, texts, text_keys)
    for key in text_keys:
        add(key, "ok")

    good = _jpeg(2)
    broken = {
        "truncated_jpeg": (good[: len(good) // 2], "image_undecodable"),
        "zero_byte_jpeg": (b"", "image_empty"),
        "html_as_jpeg": (
            b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>",
            "image_undecodable",
        ),
        "png_bomb": (png_bomb(BOMB_SIDE, BOMB_SIDE), "image_too_large"),
        "png_huge_header": (png_bomb(100_000, 100_000, rows=1), "image_too_large"),
    }
    members = [m for k, (data, _) in broken.items() for m in _sample(k, "jpg", data)]
    members += _sample("dup_key", "jpg", _jpeg(3), "the first sample of dup_key")
    members += _sample("dup_key", "jpg", _jpeg(4), "the second sample of dup_key")
    _write(directory, 2, members, [*broken, "dup_key"])
    for key, (_, status) in broken.items():
        add(key, status)
    add("dup_key", "ok", "duplicate_key")

    # Garbage over the header of garbage_2's first member: garbage_0 is cleaned, garbage_1 (the last
    # sample read) is cut, garbage_2 and garbage_3 are in the sidecar only: all three missing_image.
    garbage_keys = [f"garbage_{i}" for i in range(4)]
    tar = _write(
        directory,
        3,
        [m for i, k in enumerate(garbage_keys) for m in _sample(k, "jpg", _jpeg(10 + i))],
        garbage_keys,
    )
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as t:
        at = next(m.offset for m in t.getmembers() if m.name == "garbage_2.jpg")
    data[at : at + 1024] = np.random.default_rng(5).integers(1, 256, 1024, dtype=np.uint8).tobytes()
    tar.write_bytes(bytes(data))
    add("garbage_0", "ok")
    for key in garbage_keys[1:]:
        add(key, "missing_image")

    # Cut inside cut_2's image: cut_0 and cut_1 are cleaned, cut_2 is cut, cut_3 is in the sidecar only.
    cut_keys = [f"cut_{i}" for i in range(4)]
    tar = _write(
        directory, 4, [m for i, k in enumerate(cut_keys) for m in _sample(k, "jpg", _jpeg(20 + i))], cut_keys
    )
    with tarfile.open(tar) as t:
        at = next(m.offset_data for m in t.getmembers() if m.name == "cut_2.jpg")
    tar.write_bytes(tar.read_bytes()[: at + 200])
    add("cut_0", "ok")
    add("cut_1", "ok")
    add("cut_2", "missing_image")
    add("cut_3", "missing_image")

    _write(directory, 5, [], [])  # no members at all

    not_a_tar = _write(directory, 6, [], ["lost_0", "lost_1"])
    not_a_tar.write_bytes(b"<html><body>503 Service Unavailable</body></html>\n" * 40)
    add("lost_0", "missing_image")
    add("lost_1", "missing_image")

    _write_odd_members(directory / "00007.tar")
    for key in ("_DSC0001", "caf\ufffd", "big_number", "deep_json", "lone_surrogate", "hard_link"):
        add(key, "ok")
    add("img", "missing_image")

    sidecar = _write(directory, 8, _sample("side_0", "jpg", _jpeg(30)), ["side_0", "side_1", "side_2"])
    sidecar_parquet = directory / "00008.parquet"
    sidecar_parquet.write_bytes(sidecar_parquet.read_bytes()[:-40])
    assert sidecar.exists()
    add("side_0", "ok")

    tables = directory / "tables"
    tables.mkdir()
    keys = {"x": "ok", "x_s0": "ok", "/abs": "invalid_key", "a/b": "invalid_key", "a\0b": "invalid_key"}
    rows = [{"key": k, "image": _jpeg(40 + i), "caption": "a picture"} for i, k in enumerate(keys)]
    table = pa.Table.from_pylist(rows)
    table = table.set_column(2, "caption", table.column("caption").dictionary_encode())
    pq.write_table(table, tables / "keys.parquet")
    for key, status in keys.items():
        add(key, status)
    fifo = tables / "fifo.jpg"
    os.mkfifo(fifo)
    paths = [("dev_zero", "/dev/zero"), ("fifo", str(fifo)), ("a_file", str(tables / "good.jpg"))]
    (tables / "good.jpg").write_bytes(_jpeg(50))
    pq.write_table(
        pa.Table.from_pylist([{"key": k, "image_path": v, "caption": "a picture"} for k, v in paths]),
        tables / "paths.parquet",
    )
    add("dev_zero", "missing_image")
    add("fifo", "missing_image")
    add("a_file", "ok")

    human = directory / "human"
    human.mkdir()
    _write(
        human,
        0,
        [
            *_sample("h_empty", "jpg", b""),
            *_sample("h_html", "jpg", b"<html><body>404</body></html>"),
            *_sample("h_blank", "jpg", _jpeg(70), "   "),
            *_sample("h_good", "jpg", _jpeg(71), "a person's caption"),
        ],
        ["h_empty", "h_html", "h_blank", "h_good"],
    )
    return expected


def _write_odd_members(path: Path) -> None:
    """Shard 00007: members webdataset reads (or a tool of the web writes) that a careless reader
    drops or dies on."""
    image = _jpeg(80)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="latin-1") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("_DSC0001.jpg", image)  # a camera's file name: a sample, not webdataset metadata
        add("_DSC0001.txt", b"a photo straight from the camera")
        add("__meta__", b"webdataset's own metadata: skipped")
        add("big_number.jpg", image)
        add("big_number.json", b'{"n": ' + b"9" * 5000 + b"}")
        add("big_number.txt", b"a number too long for int()")
        add("deep_json.jpg", image)
        add("deep_json.json", b"[" * 100_000 + b"]" * 100_000)
        add("deep_json.txt", b"nested too deep")
        add("lone_surrogate.jpg", image)
        add("lone_surrogate.json", b'{"url": "http://example.com/\\ud800", "caption": "cap \\udfff"}')
        link = tarfile.TarInfo("hard_link.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "_DSC0001.jpg"
        tar.addfile(link)
        add("hard_link.txt", b"the same image through a hard link")
        add("img.v2.jpg", image)  # webdataset: key "img", extension "v2.jpg"
        add("img.txt", b"a dotted name")
    # A name that is not UTF-8 (Latin-1 "caf\xe9", as old tools write): PAX would store UTF-8, so
    # append a USTAR member written with Latin-1 names.
    with tarfile.open(path, "a", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
        for name, data in (("caf\xe9.jpg", image), ("caf\xe9.txt", b"a latin-1 name")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    directory = tmp_path_factory.mktemp("hostile")
    return directory, build_inputs(directory)


def _config(inputs: list[str], out: Path, captioner: Path, filt: Path) -> CleanConfig:
    # threshold 0: every scored text is kept, so D' holds every cleaned image to compare with its input
    return CleanConfig(
        inputs=inputs,
        output=str(out),
        captioner=str(captioner),
        filter=str(filt),
        threshold=0.0,  # and no batch size: the job chooses one
    )


@pytest.fixture(scope="module")
def job(hostile, our_captioner_dir, our_filter_dir, tmp_path_factory, ray_cluster) -> CleanSummary:
    directory, _ = hostile
    out = tmp_path_factory.mktemp("hostile_job") / "out"
    config = _config([str(directory), str(directory / "tables")], out, our_captioner_dir, our_filter_dir)
    config.human = [str(directory / "human")]
    return clean(config)


def test_every_sample_has_one_ledger_row_with_a_status_and_a_reason(job: CleanSummary, hostile) -> None:
    _, expected = hostile
    ledger = read_ledger(job.output).to_pylist()
    got: dict[str, list[str]] = {}
    for row in ledger:
        got.setdefault(row["key"], []).append(row["status"])
        assert row["reason"], row["key"]
        assert row["reason"] in REASONS if row["status"] == "ok" else row["reason"] == row["status"]
        assert (row["error_message"] is None) == (row["status"] == "ok"), row
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}
    print(f"\nhostile inputs: {len(ledger)} samples in {job.shards_total} shards, job {job.wall_s:.1f} s")
    for row in ledger:  # with -s: the table of docs/reliability.md
        print(f"| {Path(row['shard']).name} | `{row['key']}` | `{row['status']}` | `{row['reason']}` |")
    assert job.samples == len(ledger) == sum(len(v) for v in expected.values()) == 48
    assert job.shards_total == 12 and sum(job.status.values()) == 48
    manifest = [json.loads(line) for line in (job.output / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["shard"] for e in manifest) == [f"{i:05d}" for i in range(12)]


def test_odd_but_valid_images_and_texts_are_cleaned(job: CleanSummary, hostile) -> None:
    directory, _ = hostile
    rows = {r["key"]: r for r in read_ledger(job.output).to_pylist() if r["status"] == "ok"}
    for key in _odd_images():
        assert rows[key]["web_itm"] is not None and rows[key]["synthetic"], key
    assert "\ufffd" in rows["non_utf8_text"]["web_text"]  # undecodable bytes are replaced
    assert rows["long_text"]["web_text"] == LONG_TEXT and rows["long_text"]["web_itm"] is not None
    assert rows["control_char_text"]["web_text"] == CONTROL_TEXT  # kept as the web gave it
    assert rows["no_txt"]["web_text"] == "the caption from the json"
    assert rows["no_txt_no_caption"]["web_text"] is None and rows["no_txt_no_caption"]["web_itm"] is None
    assert rows["no_json"]["web_text"] == "a text without a json" and rows["no_json"]["url"] is None
    # D': every cleaned image under its input's bytes (threshold 0 keeps all), the first dup_key's.
    import webdataset as wds

    inputs = {}
    for tar in sorted(directory.glob("*.tar"))[:3]:
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                if ext in ("jpg", "png", "webp"):
                    inputs.setdefault(key, (ext, t.extractfile(m).read()))  # type: ignore[union-attr]
    urls = [str(p) for p in sorted((job.output / "dprime").glob("*.tar"))]
    seen = set()
    for pair in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(pair["json"])
        if meta["source_key"] in inputs:
            ext, data = inputs[meta["source_key"]]
            assert pair[ext] == data, meta["source_key"]
            seen.add(meta["source_key"])
    assert set(_odd_images()) | {"dup_key", "no_json", "long_text"} <= seen


def test_broken_images_get_a_decode_reason_naming_the_sample(job: CleanSummary) -> None:
    rows = [r for r in read_ledger(job.output).to_pylist() if r["status"] in DECODE_REASONS]
    assert {r["key"] for r in rows} == {
        "truncated_jpeg",
        "zero_byte_jpeg",
        "html_as_jpeg",
        "png_bomb",
        "png_huge_header",
    }
    for row in rows:
        assert row["key"] in row["error_message"] and " at 0x" not in row["error_message"]
        assert row["web_itm"] is None and not row["web_kept"] and not row["synthetic"]
    bomb = next(r for r in rows if r["key"] == "png_bomb")
    assert "144000000 pixels" in bomb["error_message"]


def test_damaged_shards_are_reported_and_the_job_goes_on(job: CleanSummary, hostile) -> None:
    directory, _ = hostile
    stats = {
        s["input"]: s for s in (json.loads(p.read_text()) for p in (job.output / "stats").glob("*.json"))
    }
    damaged = {str(directory / f"{i:05d}.tar") for i in (3, 4, 6, 8)}
    assert set(job.read_errors) == damaged
    for source, s in stats.items():
        assert (s["read_error"] is not None) == (source in damaged), source
    assert "unreadable data at byte" in stats[str(directory / "00003.tar")]["read_error"]
    assert "unexpected end of data" in stats[str(directory / "00004.tar")]["read_error"]
    assert "not a tar file" in stats[str(directory / "00006.tar")]["read_error"]
    assert stats[str(directory / "00005.tar")]["samples"] == 0
    assert "cannot read the sidecar" in stats[str(directory / "00008.tar")]["read_error"]
    # Samples lost to the damage carry the shard's error, which names the shard.
    for row in read_ledger(job.output).to_pylist():
        if row["shard"] in damaged and row["status"] == "missing_image" and "00008" not in row["shard"]:
            assert row["error_message"] == job.read_errors[row["shard"]]
            assert row["error_message"].startswith(f"cannot read shard {row['shard']}: ")


def test_duplicate_key_in_a_tar_is_reported_and_the_first_is_cleaned(job: CleanSummary) -> None:
    rows = [r for r in read_ledger(job.output).to_pylist() if r["key"] == "dup_key"]
    assert [r["status"] for r in rows] == ["duplicate_key", "ok"]  # the ledger's order: key, status
    assert rows[1]["web_text"] == "the first sample of dup_key"
    assert (
        rows[0]["web_text"] == "the second sample of dup_key" and "earlier sample" in rows[0]["error_message"]
    )


BOMB_PROBE = """
import re, sys
from PIL import Image
from capfilt.images import ImageError, open_image

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def peak_since_reset_mib(fn):
    # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS, so the peak
    # measures this step alone, whatever the imports before it touched and the kernel reclaimed.
    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    result = fn()
    return result, (kib("VmHWM") - before) / 1024

data = open(sys.argv[1], "rb").read()

def refuse():
    try:
        open_image(data, name="png_bomb")
        return "decoded"
    except ImageError as err:
        return err.reason

reason, refused = peak_since_reset_mib(refuse)
Image.MAX_IMAGE_PIXELS = None  # the control: the same file decoded with every limit off
image, decoded = peak_since_reset_mib(lambda: open_image(data, max_pixels=10**10))
print(reason, refused, decoded)
"""


def test_the_bomb_is_refused_without_allocating_it(tmp_path: Path) -> None:
    """Peak memory of a fresh process: refusing the bomb costs nothing, decoding it (the control,
    limits off) costs its 144 M pixels, so the measurement would see an allocation."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(BOMB_SIDE, BOMB_SIDE))
    done = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(bomb)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reason, refused_mib, decoded_mib = done.stdout.split()
    print(f"\nbomb: {reason}, peak memory +{refused_mib} MiB refused, +{decoded_mib} MiB decoded (control)")
    assert reason == "image_too_large"
    assert float(refused_mib) < 16, f"refusing the bomb raised peak memory by {refused_mib} MiB"
    assert float(decoded_mib) > BOMB_SIDE**2 / 2**20 * 0.9, (
        "the control decode did not show in the measurement"
    )


def test_a_parquet_table_of_the_wrong_schema_stops_the_job_before_any_work(
    hostile, our_captioner_dir, our_filter_dir, tmp_path
) -> None:
    """Even beside good inputs: a file given as an image table that is none is the user's mistake
    (a wrong path or glob), and cleaning the rest would silently leave its samples out of D'."""
    directory, _ = hostile
    table = tmp_path / "wrong_schema.parquet"
    rows = [{"image": 1, "caption": 2, "key": "a"}]
    schema = pa.schema([("image", pa.int64()), ("caption", pa.int64()), ("key", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), table)
    out = tmp_path / "out"
    with pytest.raises(CapfiltError) as err:
        clean(_config([str(directory), str(table)], out, our_captioner_dir, our_filter_dir))
    message = str(err.value)
    assert message.startswith(f"--input: {table} is neither an image table")
    assert "image (int64), caption (int64), key (string)" in message
    assert "image bytes (image, jpg, png, webp, image_bytes" in message
    assert not out.exists(), "the job must stop before it creates its output"
    assert os.listdir(tmp_path) == [table.name]


def test_a_text_column_of_another_type_is_refused_by_name(
    hostile, our_captioner_dir, our_filter_dir, tmp_path
) -> None:
    """A `caption` of int64 (or a list) is not silently passed over as "no text": the web texts
    of every row would be lost without a word."""
    directory, _ = hostile
    table = tmp_path / "int_caption.parquet"
    pq.write_table(pa.Table.from_pylist([{"key": "w", "image": _jpeg(60), "caption": 7}]), table)
    with pytest.raises(
        CapfiltError, match=r"column 'caption' is int64, but CapFilt reads it as text; cast it"
    ):
        clean(_config([str(directory), str(table)], tmp_path / "out", our_captioner_dir, our_filter_dir))


def test_odd_member_names_and_metadata_are_samples_not_failures(job: CleanSummary) -> None:
    rows = {r["key"]: r for r in read_ledger(job.output).to_pylist()}
    assert rows["_DSC0001"]["web_text"] == "a photo straight from the camera"
    assert "__meta__" not in rows
    assert rows["caf\ufffd"]["web_text"] == "a latin-1 name"  # the name's bad byte is U+FFFD
    assert rows["big_number"]["web_text"] == "a number too long for int()"
    assert rows["lone_surrogate"]["url"] == "http://example.com/\ufffd"
    assert rows["lone_surrogate"]["web_text"] == "cap \ufffd"
    assert rows["hard_link"]["web_itm"] is not None
    assert "'v2.jpg'" in rows["img"]["error_message"] and "first '.'" in rows["img"]["error_message"]


def test_table_keys_dprime_cannot_hold_are_refused_and_dprime_keys_are_unique(job: CleanSummary) -> None:
    rows = {r["key"]: r for r in read_ledger(job.output).to_pylist()}
    assert rows["x"]["web_text"] == "a picture"  # read from a dictionary-encoded column
    for key in ("/abs", "a/b", "a\0b"):
        assert rows[key]["status"] == "invalid_key" and repr(key) in rows[key]["error_message"], key
    for key in ("dev_zero", "fifo"):
        assert "not a regular file" in rows[key]["error_message"], rows[key]
    names: list[str] = []
    for tar in sorted((job.output / "dprime").glob("*.tar")):
        with tarfile.open(tar) as t:
            members = t.getnames()
        assert len(members) == len(set(members)), tar
        names += members
    assert not any(n.startswith("/") or "/" in n for n in names)
    # x's synthetic pair would be x_s0, the key of another input: it takes the next free name.
    index = pq.read_table(job.output / "dprime_index").to_pylist()
    assert {(r["key"], r["source_key"]) for r in index if r["source_key"] in ("x", "x_s0")} >= {
        ("x", "x"),
        ("x_s0", "x_s0"),
        ("x_s0_2", "x"),
    }


def test_human_pairs_that_cannot_go_into_dprime_are_listed_with_reasons(job: CleanSummary) -> None:
    stats = [json.loads(p.read_text()) for p in (job.output / "stats").glob("*.json")]
    human = next(s for s in stats if s["kind"] == "human")
    assert human["dprime_pairs"] == 1 and human["skipped"] == 3
    assert {s["key"]: s["reason"] for s in human["skipped_samples"]} == {
        "h_empty": "image_empty",
        "h_html": "image_undecodable",
        "h_blank": "no_text",
    }
    assert human["skipped_reasons"] == {"image_empty": 1, "image_undecodable": 1, "no_text": 1}


def test_the_job_chose_its_batch_size(job: CleanSummary) -> None:
    # No --batch-size: on CPUs the largest up to 128 whose decoding cache fits (the tiny model's does).
    assert job.resources["batch_size"] == 128
