"""The clean job's inputs beyond local tars: parquet image tables (image bytes or image paths),
fsspec URLs (file://, http:// from a local server) and globs; what is refused before any work."""

from __future__ import annotations

import functools
import http.server
import io
import math
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.data import Sample as WebSample
from capfilt.data import input_files, iter_samples
from capfilt.errors import CapfiltError
from capfilt.ledger import read_ledger
from capfilt.pipelines.clean import CleanConfig, clean
from capfilt.pipelines.clean_inputs import original_images, read_input
from capfilt.pipelines.clean_tables import table_columns
from capfilt.world.writer import SIDECAR_SCHEMA, Sample, write_shard

SEED = 7
THRESHOLD = 0.0222  # as test_clean: the tiny random filter's p(match) lie in 0.020-0.023
FAILED_KEY = "000099990"


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static server that answers Range requests, as object stores and web servers do: fsspec
    reads a tar and a parquet footer by ranges."""

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> io.BytesIO | None:  # type: ignore[override]
        spec = self.headers.get("Range")
        if not spec:
            return super().send_head()  # type: ignore[return-value]
        try:
            data = Path(self.translate_path(self.path)).read_bytes()
        except OSError:
            self.send_error(404)
            return None
        first, _, last = spec.removeprefix("bytes=").partition("-")
        start = int(first) if first else len(data) - int(last)
        end = min(int(last) if first and last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


@pytest.fixture(scope="module")
def web(world: Path) -> list[WebSample]:
    return list(iter_samples(world / "web"))


@pytest.fixture(scope="module")
def tar_dir(web: list[WebSample], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One img2dataset shard of 8 samples whose sidecar also lists a failed download."""
    out = tmp_path_factory.mktemp("tar_input")
    write_shard(out, 0, [Sample(s.key, s.image, s.text, s.meta["url"], 32, 32) for s in web[:8]])
    sidecar = pq.read_table(out / "00000.parquet").to_pylist()
    failed = {**sidecar[0], "key": FAILED_KEY, "status": "failed_to_download", "error_message": "HTTP 404"}
    pq.write_table(pa.Table.from_pylist([*sidecar, failed], schema=SIDECAR_SCHEMA), out / "00000.parquet")
    return out


@pytest.fixture(scope="module")
def tables(web: list[WebSample], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with no tar and two image tables:

    bytes.parquet   img2dataset's parquet output: key, jpg, caption, url, status, error_message;
                    6 images, a failed download (jpg null), a row without key (gets a derived key)
    paths.parquet   image_path (relative to the table) and text, no key: 5 files, one path missing
    """
    out = tmp_path_factory.mktemp("tables")
    rows: list[dict[str, Any]] = [
        {"key": s.key, "jpg": s.image, "caption": s.text, "url": s.meta["url"], "status": "success"}
        for s in web[:6]
    ]
    rows.append({"key": FAILED_KEY, "jpg": None, "caption": "gone", "status": "failed_to_download"})
    rows[-1]["error_message"] = "HTTP 404"
    rows.append({"key": None, "jpg": web[6].image, "caption": web[6].text, "status": "success"})
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("jpg", pa.binary()),
            ("caption", pa.string()),
            ("url", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "bytes.parquet")
    (out / "images").mkdir()
    paths = []
    for s in web[10:15]:
        (out / "images" / f"{s.key}.jpg").write_bytes(s.image)
        paths.append({"image_path": f"images/{s.key}.jpg", "text": s.text})
    paths.insert(2, {"image_path": "images/gone.jpg", "text": "a file nobody kept"})
    pq.write_table(pa.Table.from_pylist(paths), out / "paths.parquet")
    return out


@pytest.fixture(scope="module")
def server(tar_dir: Path, tables: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving tar_dir's parent (both fixtures' directories sit there)."""
    assert tar_dir.parent == tables.parent
    handler = functools.partial(_RangeHandler, directory=str(tar_dir.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


def _config(inputs: list[str], out: Path, captioner: Path, filt: Path, **changes: Any) -> CleanConfig:
    base: dict[str, Any] = dict(num_captions=1, batch_size=8, seed=SEED, threshold=THRESHOLD)
    return CleanConfig(inputs, str(out), str(captioner), str(filt), **{**base, **changes})


def _dprime(out: Path) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """D' read with webdataset: key -> (jpg bytes, json)."""
    import json

    import webdataset as wds

    urls = [str(p) for p in sorted((out / "dprime").glob("*.tar"))]
    pairs = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in pairs
        pairs[s["__key__"]] = (s["jpg"], json.loads(s["json"]))
    return pairs


def test_image_tables_with_bytes_or_paths_are_cleaned_with_their_original_bytes(
    tables: Path, web: list[WebSample], our_captioner_dir, our_filter_dir, tmp_path, ray_cluster
) -> None:
    human = [str(tables / "paths.parquet")]  # a table as human data too: its pairs go to D' as they are
    summary = clean(_config([str(tables)], tmp_path / "out", our_captioner_dir, our_filter_dir, human=human))
    ledger = read_ledger(summary.output).to_pylist()
    by_key = {r["key"]: r for r in ledger}
    derived = {"bytes_000000007"} | {f"paths_{i:09d}" for i in range(6)}
    assert (
        len(ledger) == len(by_key) == 14 and set(by_key) == {s.key for s in web[:6]} | {FAILED_KEY} | derived
    )
    bytes_table, paths_table = (
        str((tables / "bytes.parquet").resolve()),
        str((tables / "paths.parquet").resolve()),
    )
    assert {r["shard"] for r in ledger} == {bytes_table, paths_table}
    assert (
        by_key[FAILED_KEY]["status"] == "failed_to_download"
        and by_key[FAILED_KEY]["error_message"] == "HTTP 404"
    )
    gone = by_key["paths_000000002"]
    assert gone["status"] == "missing_image" and gone["shard"] == paths_table
    assert "image file not found" in gone["error_message"] and "images/gone.jpg" in gone["error_message"]
    assert summary.status == {"failed_to_download": 1, "missing_image": 1, "ok": 12}
    assert (
        by_key["paths_000000000"]["web_text"] == web[10].text
        and by_key[web[0].key]["url"] == web[0].meta["url"]
    )
    # D': every kept pair's image is the input's bytes, from the bytes column or the named file.
    inputs = {s.key: s.image for s in web[:6]} | {"bytes_000000007": web[6].image}
    inputs |= {f"paths_{i:09d}": s.image for i, s in zip((0, 1, 3, 4, 5), web[10:15])}
    pairs = _dprime(summary.output)
    assert summary.web_kept + summary.synthetic_kept + summary.human_pairs == len(pairs)
    assert summary.web_kept + summary.synthetic_kept > 0 and summary.human_pairs == 5
    for key, (image, meta) in pairs.items():
        assert image == inputs[meta["source_key"]]
        if meta["origin"] == "human":
            assert key == f"{meta['source_key']}_h" and meta["itm"] is None
        else:
            assert meta["itm"] > THRESHOLD
    assert {meta["source_key"] for _, meta in pairs.values()} <= {
        k for k, r in by_key.items() if r["status"] == "ok"
    }
    index = pq.read_table(summary.output / "dprime_index").to_pylist()
    assert {r["shard"] for r in index} <= {bytes_table, paths_table}


def _comparable(out: Path) -> list[dict[str, Any]]:
    return sorted(read_ledger(out).to_pylist(), key=lambda r: r["key"])


def _same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> None:
    assert [r["key"] for r in a] == [r["key"] for r in b]
    floats = ("web_itm", "web_itc")
    for x, y in zip(a, b):
        for f in floats:
            assert (x[f] is None and y[f] is None) or math.isclose(x[f], y[f], abs_tol=1e-6), x["key"]
        skip = {*floats, "synthetic", *ignore}
        assert {k: v for k, v in x.items() if k not in skip} == {k: v for k, v in y.items() if k not in skip}
        assert [c["text"] for c in x["synthetic"]] == [c["text"] for c in y["synthetic"]]


def test_tar_through_file_url_glob_and_http_gives_the_local_ledger(
    tar_dir: Path, server: str, our_captioner_dir, our_filter_dir, tmp_path, ray_cluster
) -> None:
    tar = tar_dir / "00000.tar"
    local = clean(_config([str(tar)], tmp_path / "local", our_captioner_dir, our_filter_dir))
    rows = _comparable(local.output)
    assert len(rows) == 9 and {r["shard"] for r in rows} == {str(tar.resolve())}
    assert next(r for r in rows if r["key"] == FAILED_KEY)["status"] == "failed_to_download"
    # A file:// URL and a glob name the very same shard: the finished job resumes with nothing left
    # to do (its job.json matches), so their ledger is the local one itself.
    for entry in (tar.resolve().as_uri(), str(tar_dir / "0000?.tar")):
        again = clean(_config([entry], tmp_path / "local", our_captioner_dir, our_filter_dir, resume=True))
        assert again.shards_skipped == 1 and again.run_samples == 0 and again.samples == 9
    assert _comparable(local.output) == rows
    # Over http, tar and sidecar are read by fsspec; the ledger names the URL.
    tar_url = f"{server}/{tar_dir.name}/00000.tar"
    remote = clean(_config([tar_url], tmp_path / "http", our_captioner_dir, our_filter_dir))
    remote_rows = _comparable(remote.output)
    _same_rows(rows, remote_rows, ignore=("shard",))
    assert {r["shard"] for r in remote_rows} == {tar_url}

    def pairs(out: Path) -> dict[str, tuple[bytes, dict[str, Any]]]:
        return {
            k: (img, {f: v for f, v in meta.items() if f != "itm"}) for k, (img, meta) in _dprime(out).items()
        }

    assert remote.dprime_pairs == local.dprime_pairs and pairs(remote.output) == pairs(local.output)


def test_inputs_resolve_the_same_through_paths_urls_and_globs(
    tar_dir: Path, tables: Path, server: str
) -> None:
    from capfilt.data import input_files

    tar = str((tar_dir / "00000.tar").resolve())
    assert (
        input_files([str(tar_dir)]) == input_files([str(tar_dir / "*")]) == [tar]
    )  # the sidecar is no input
    assert input_files([Path(tar).as_uri()]) == input_files([str(tar_dir / "0000?.tar")]) == [tar]
    assert input_files([str(tables)]) == [
        str((tables / n).resolve()) for n in ("bytes.parquet", "paths.parquet")
    ]
    assert input_files([f"{server}/{tables.name}/paths.parquet"]) == [f"{server}/{tables.name}/paths.parquet"]
    with pytest.raises(CapfiltError, match=r"00000\.parquet is img2dataset's sidecar of .*00000\.tar"):
        input_files([str(tar_dir / "00000.parquet")])
    with pytest.raises(
        CapfiltError, match=r"\*\.parquet holds no tar shards \(.tar, .*\) or parquet image tables"
    ):
        input_files([str(tar_dir / "*.parquet")])


def test_bad_inputs_fail_before_any_work(tar_dir: Path, our_captioner_dir, our_filter_dir, tmp_path) -> None:
    import importlib.util

    out = tmp_path / "out"
    sidecar = pq.read_table(tar_dir / "00000.parquet")
    pq.write_table(sidecar, tmp_path / "urls.parquet")  # a sidecar without its tar: no image column
    with pytest.raises(CapfiltError) as err:
        clean(_config([str(tmp_path / "urls.parquet")], out, our_captioner_dir, our_filter_dir))
    message = str(err.value)
    assert message.startswith("--input: ") and "urls.parquet" in message
    assert "url (string), caption (string), key (string)" in message  # what it has
    assert (
        "image, jpg, png, webp, image_bytes" in message and "image_path, path, file" in message
    )  # what counts
    assert "caption, text, txt" in message
    # Images without a text column are an image table (the captioner writes their texts).
    images_only = sidecar.drop_columns(["caption"]).append_column("jpg", pa.nulls(9, pa.binary()))
    assert table_columns(images_only.schema, "t.parquet").text is None
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(CapfiltError, match=r"--input: .*junk\.parquet: not a readable parquet file"):
        clean(_config([str(tmp_path / "junk.parquet")], out, our_captioner_dir, our_filter_dir))
    with pytest.raises(CapfiltError, match=r"--input: nosuch://x/00000\.tar: Protocol not known: nosuch"):
        clean(_config(["nosuch://x/00000.tar"], out, our_captioner_dir, our_filter_dir))
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(CapfiltError, match=r"--input: s3://bucket/00000\.tar: .*pip install s3fs"):
            clean(_config(["s3://bucket/00000.tar"], out, our_captioner_dir, our_filter_dir))
    assert not out.exists()


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def test_image_table_reader_struct_column_keys_and_http(
    tables: Path, web: list[WebSample], server: str
) -> None:
    """Hugging Face's Image struct (bytes, else path), duplicate and dotted keys, a table over http."""
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    (tables.parent / "hf").mkdir(exist_ok=True)
    (tables.parent / "hf" / "blue.png").write_bytes(blue)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"image": {"bytes": red, "path": "ignored.png"}, "text": "red", "key": "a"},
        {"image": {"bytes": None, "path": "blue.png"}, "text": "blue", "key": "b"},
        {"image": {"bytes": red, "path": None}, "text": "again", "key": "a"},
        {"image": {"bytes": red, "path": None}, "text": "dotted", "key": "c.1"},
        {"image": None, "text": "nothing", "key": "d"},
    ]
    schema = pa.schema([("image", image), ("text", pa.string()), ("key", pa.string())])
    path = tables.parent / "hf" / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    samples, error = read_input(str(path))
    assert error is None
    got = [(s.key, s.status, s.text) for s in samples]
    assert got == [
        ("a", "ok", "red"),
        ("b", "ok", "blue"),
        ("a", "duplicate_key", "again"),
        ("c.1", "invalid_key", "dotted"),
        ("d", "missing_image", "nothing"),
    ]
    assert samples[0].image == red and samples[1].image == blue and samples[0].ext == samples[1].ext == "png"
    assert all(s.image is None and s.error_message for s in samples[2:])
    assert original_images(str(path), {"a", "b", "d"}) == {"a": red, "b": blue}
    # Over http: relative image paths resolve against the table's URL.
    remote, _ = read_input(f"{server}/{tables.name}/paths.parquet")
    assert [s.image for s in remote if s.status == "ok"] == [s.image for s in web[10:15]]
    assert "image file not found" in next(s.error_message for s in remote if s.status != "ok")


@pytest.mark.parametrize("ext", ["gif", "bmp", "tiff", "avif"])
def test_images_under_other_extensions_are_read_as_images(tmp_path: Path, ext: str) -> None:
    """Originals kept under their own extension (GIF, BMP, TIFF, AVIF) are images, not missing
    ones, and D' keeps a table's bytes of them under that extension (AVIF: before, `.jpg`)."""
    import io
    import tarfile

    from PIL import Image, features

    from capfilt.images import open_image
    from capfilt.pipelines.clean_inputs import InputSample, read_input

    if ext == "avif" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format={"tiff": "TIFF"}.get(ext, ext.upper()))
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in ((f"k0.{ext}", buffer.getvalue()), ("k0.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,), error = read_input(str(shard))
    assert error is None and sample.status == "ok" and sample.text == "a red square"
    assert sample.image == buffer.getvalue()
    pixel = open_image(sample.image).getpixel((0, 0))
    assert max(abs(a - b) for a, b in zip(pixel, (200, 10, 10))) <= 8  # AVIF is lossy
    assert InputSample("k1", buffer.getvalue(), None, None, {}).ext == {"tiff": "tif"}.get(ext, ext)


# ── damaged and unusual inputs: each sample still ends kept or rejected, and the job goes on ──────


def _table_of(web: list[WebSample], n: int, **columns: Any) -> pa.Table:
    rows = [{"key": s.key, "jpg": s.image, "caption": s.text} for s in web[:n]]
    return pa.Table.from_pylist(
        rows, schema=pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string())])
    )


def _damaged_table(web: list[WebSample], path: Path) -> Path:
    """12 rows in row groups of 4, the second group's first page header overwritten."""
    pq.write_table(_table_of(web, 12), path, row_group_size=4)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_table_keeps_the_rows_read_before_the_damage(web: list[WebSample], tmp_path: Path) -> None:
    path = _damaged_table(web, tmp_path / "damaged.parquet")
    samples, error = read_input(str(path))
    assert [s.key for s in samples] == [s.key for s in web[:4]]
    assert all(s.status == "ok" and s.image for s in samples)
    assert error is not None and "cannot read image table" in error and "damaged.parquet" in error
    assert "rows 4 to 11 of 12 are lost" in error
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    samples, error = read_input(str(tmp_path / "junk.parquet"))  # never raises: the shard's error
    assert samples == [] and error is not None and "junk.parquet" in error


def test_text_that_is_not_utf8_and_tables_without_text(web: list[WebSample], tmp_path: Path) -> None:
    captions = pa.array([b"caf\xe9 \xff on a table", b"fine"], pa.binary()).view(pa.string())
    table = pa.table({"key": ["a", "b"], "jpg": [web[0].image, web[1].image], "caption": captions})
    pq.write_table(table, tmp_path / "latin1.parquet")
    samples, error = read_input(str(tmp_path / "latin1.parquet"))
    assert error is None
    assert [(s.key, s.status, s.text) for s in samples] == [
        ("a", "ok", "caf\ufffd \ufffd on a table"),
        ("b", "ok", "fine"),
    ]
    pq.write_table(pa.table({"jpg": [web[0].image]}), tmp_path / "images_only.parquet")
    (sample,), error = read_input(str(tmp_path / "images_only.parquet"))
    assert error is None and sample.status == "ok" and sample.text is None and sample.image == web[0].image


@pytest.mark.parametrize("mode", ["xz", "gz"])
def test_a_corrupt_compressed_tar_is_the_shards_read_error(
    tar_dir: Path, web: list[WebSample], tmp_path: Path, mode: str
) -> None:
    import tarfile

    path = tmp_path / f"00000.tar.{mode}"
    with tarfile.open(tar_dir / "00000.tar") as source, tarfile.open(path, f"w:{mode}") as tar:
        for member in source:
            tar.addfile(member, source.extractfile(member))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    samples, error = read_input(str(path))  # no exception out of the shard
    assert error is not None and f"00000.tar.{mode}" in error
    assert {s.key for s in samples} <= {s.key for s in web[:8]}  # what was read before the damage


def test_bad_shards_are_recorded_and_the_job_goes_on(
    tar_dir: Path, web: list[WebSample], our_captioner_dir, our_filter_dir, tmp_path, ray_cluster, monkeypatch
) -> None:
    """A damaged table, a file that is no parquet at all, and kept images that cannot be read
    again when D' is written: the job finishes, and the ledger and stats say what happened."""
    from capfilt.pipelines import clean_output

    (tmp_path / "in").mkdir()
    damaged = _damaged_table(web, tmp_path / "in" / "damaged.parquet")
    (tmp_path / "in" / "junk.parquet").write_bytes(b"not parquet")
    real = clean_output.read_input

    def tar_images_gone(source: str, keys: Any = None) -> Any:  # the tar's store fails on the re-read
        samples, error = real(source, keys)
        if source.endswith(".tar"):
            for s in samples:
                s.image = None
        return samples, error

    monkeypatch.setattr(clean_output, "read_input", tar_images_gone)
    inputs = [str(tar_dir / "00000.tar"), str(damaged), str(tmp_path / "in" / "junk.parquet")]
    summary = clean(_config(inputs, tmp_path / "out", our_captioner_dir, our_filter_dir, threshold=0.0))
    ledger = read_ledger(summary.output).to_pylist()
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in ledger:
        by_shard.setdefault(Path(row["shard"]).name, []).append(row)
    assert sorted(by_shard) == ["00000.tar", "damaged.parquet"]  # junk has no samples to account for
    assert [r["key"] for r in sorted(by_shard["damaged.parquet"], key=lambda r: r["key"])] == sorted(
        s.key for s in web[:4]
    )
    lost = [r for r in by_shard["00000.tar"] if r["status"] == "missing_image" and r["web_itm"] is not None]
    assert len(lost) == 8  # scored and kept (threshold 0), then their images were gone
    assert all("could not be read again" in r["error_message"] and not r["web_kept"] for r in lost)
    assert all(not r["synthetic_kept"] for r in lost)
    errors = {Path(k).name: v for k, v in summary.read_errors.items()}
    assert set(errors) == {"damaged.parquet", "junk.parquet"}
    assert "rows 4 to 11 of 12 are lost" in errors["damaged.parquet"]
    pairs = _dprime(summary.output)
    assert {meta["source_key"] for _, meta in pairs.values()} == {s.key for s in web[:4]} - {
        r["key"] for r in by_shard["damaged.parquet"] if not (r["web_kept"] or r["synthetic_kept"])
    }


def test_image_roots_confine_the_image_paths_a_table_names(
    web: list[WebSample], tmp_path: Path, server: str, monkeypatch
) -> None:
    from capfilt.pipelines.clean_tables import IMAGE_ROOTS_ENV

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (root / "images" / "in.jpg").write_bytes(web[0].image)
    (outside / "secret.jpg").write_bytes(web[1].image)
    (root / "images" / "link.jpg").symlink_to(outside / "secret.jpg")
    paths = ["images/in.jpg", str(outside / "secret.jpg"), "../outside/secret.jpg", "images/link.jpg"]
    paths.append(f"{server}/x.jpg")
    pq.write_table(pa.table({"image_path": paths, "key": list("abcde")}), root / "t.parquet")
    monkeypatch.setenv(IMAGE_ROOTS_ENV, str(root))
    samples, error = read_input(str(root / "t.parquet"))
    assert error is None
    assert [(s.key, s.status) for s in samples] == [("a", "ok")] + [(k, "missing_image") for k in "bcde"]
    assert samples[0].image == web[0].image and all(s.image is None for s in samples[1:])
    assert all("outside the allowed roots" in s.error_message for s in samples[1:4])
    assert "only local files under the allowed roots are read" in samples[4].error_message
    monkeypatch.delenv(IMAGE_ROOTS_ENV)  # unset: the command line's user reads what their tables name
    assert [s.status for s in read_input(str(root / "t.parquet"))[0]][:4] == ["ok"] * 4


def test_tars_joined_with_cat_are_a_read_error_not_a_silent_loss(tmp_path: Path) -> None:
    """webdataset (and tarfile) stop at the first end-of-archive marker: the second tar's samples
    would vanish unseen. The shard's read error says so; the first tar's samples are whole."""
    import tarfile

    def archive(keys: list[str]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key in keys:
                for ext, data in (("png", _png((1, 2, 3))), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    joined = tmp_path / "joined.tar"
    joined.write_bytes(archive(["a", "b"]) + archive(["c"]))
    samples, error = read_input(str(joined))
    assert [(s.key, s.status) for s in samples] == [("a", "ok"), ("b", "ok")]
    assert (
        error is not None and "another tar archive starts at byte" in error and "tar --concatenate" in error
    )
    trailing = tmp_path / "trailing.tar"
    trailing.write_bytes(archive(["a"]) + b"not a tar header " * 64)  # junk after the end: ignored
    assert read_input(str(trailing))[1] is None


def test_a_directory_of_tars_names_the_image_tables_it_leaves_out(
    tar_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from capfilt.data import input_files

    mixed = tmp_path / "mixed"
    shutil.copytree(tar_dir, mixed)
    pq.write_table(pa.table({"image": [b"x"], "caption": ["a"]}), mixed / "extra_table.parquet")
    with caplog.at_level("WARNING", logger="capfilt.data"):
        found = input_files([str(mixed)])
    assert found and all(f.endswith(".tar") for f in found)
    assert "extra_table.parquet" in caplog.text and "not read; name them" in caplog.text


def _tar_with(path: Path, members: list[tuple[str, bytes | tarfile.TarInfo]]) -> Path:
    """A tar of (name, bytes) files and ready-made TarInfo entries (links, sparse files...)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _link(name: str, target: str, kind: bytes = tarfile.LNKTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_a_hard_link_with_no_file_behind_it_is_that_samples_problem(tmp_path: Path) -> None:
    """Links to a member not in the tar, to a later one, to itself, to a directory: each is that
    sample's missing image, named; the tar's other samples and its sidecar are read as ever (before,
    tarfile's KeyError made the whole shard a read error with no samples)."""
    png = _png((200, 10, 10))
    directory = tarfile.TarInfo("adir")
    directory.type = tarfile.DIRTYPE
    shard = _tar_with(
        tmp_path / "00000.tar",
        [
            ("good.png", png),
            ("good.txt", b"a red square"),
            ("gone.png", _link("gone.png", "elsewhere/gone.png")),
            ("gone.txt", b"its image links to nothing"),
            ("ahead.png", _link("ahead.png", "later.png")),
            ("self.png", _link("self.png", "self.png")),
            ("adir", directory),
            ("todir.png", _link("todir.png", "adir")),
            ("later.png", png),
            ("copy.png", _link("copy.png", "good.png")),
        ],
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "key": "failed",
                    "status": "failed_to_download",
                    "error_message": "HTTP 404",
                    "caption": "c",
                    "url": "u",
                }
            ],
            schema=SIDECAR_SCHEMA,
        ),
        tmp_path / "00000.parquet",
    )
    samples, error = read_input(str(shard))
    assert error is None
    by_key = {s.key: s for s in samples}
    assert sorted(by_key) == ["ahead", "copy", "failed", "gone", "good", "later", "self", "todir"]
    assert [by_key[k].status for k in ("good", "later", "copy")] == ["ok"] * 3
    assert by_key["copy"].image == png and by_key["good"].text == "a red square"
    assert by_key["failed"].status == "failed_to_download"
    for key, target in (
        ("gone", "elsewhere/gone.png"),
        ("ahead", "later.png"),
        ("self", "self.png"),
        ("todir", "adir"),
    ):
        assert by_key[key].status == "missing_image"
        assert (
            f"{key}.png is a hard link to {target!r}, which is no file read before it"
            in by_key[key].error_message
        )
    assert by_key["gone"].text == "its image links to nothing"


def test_texts_over_the_limit_are_not_read_and_unused_members_not_at_all(tmp_path: Path, monkeypatch) -> None:
    """A .txt over MAX_TEXT_BYTES is the sample's TEXT_TOO_LARGE, judged by the size its header
    declares (a 20 kB tar can declare a GB of sparse text, which every stage, the ledger and D' held
    before); a .json over it is as if there were none; members the job does not use (.npy, .cls)
    are listed but never read."""
    from capfilt.pipelines import clean_inputs

    png = _png((10, 200, 10))
    members = [
        ("big.png", png), ("big.txt", b"x" * 5000),
        ("meta.png", png), ("meta.txt", b"a green square"), ("meta.json", b'{"url": "' + b"u" * 5000 + b'"}'),
        ("extra.png", png), ("extra.txt", b"with an embedding"), ("extra.npy", b"\x00" * 6000),
        ("fine.png", png), ("fine.txt", b"a green square"),
    ]  # fmt: skip
    shard = _tar_with(tmp_path / "00000.tar", members)
    monkeypatch.setattr(clean_inputs, "MAX_TEXT_BYTES", 4096)
    samples, error = read_input(str(shard))
    assert error is None
    by_key = {s.key: s for s in samples}
    assert by_key["big"].status == "text_too_large" and by_key["big"].text is None
    assert (
        by_key["big"].error_message
        == f"big.txt in {shard} is 5000 bytes, over the 4096-byte limit for a text"
    )
    assert (
        by_key["meta"].status == "ok"
        and by_key["meta"].meta == {}
        and by_key["meta"].text == "a green square"
    )
    assert by_key["extra"].status == "ok" and by_key["extra"].text == "with an embedding"
    assert by_key["fine"].status == "ok"
    raw = {s.key: s for s in clean_inputs.read_tar(str(shard))[0]}
    assert raw["extra"].files["npy"] == b""  # listed, not read


def test_a_sample_of_symbolic_links_only_still_has_its_row(tmp_path: Path) -> None:
    shard = _tar_with(
        tmp_path / "00000.tar",
        [
            ("s.png", _link("s.png", "/etc/passwd", tarfile.SYMTYPE)),
            ("s.txt", _link("s.txt", "x", tarfile.SYMTYPE)),
        ],
    )
    (sample,), error = read_input(str(shard))
    assert error is None and sample.key == "s" and sample.status == "missing_image"
    assert "s.png is a symbolic link (to '/etc/passwd'), which is not followed" in sample.error_message
    assert sample.image is None and sample.text is None


def test_table_texts_over_the_limit_and_all_null_captions(
    web: list[WebSample], tmp_path: Path, monkeypatch
) -> None:
    from capfilt.pipelines import clean_inputs, clean_tables

    monkeypatch.setattr(clean_tables, "MAX_TEXT_BYTES", 1000)
    table = pa.table({"key": ["a", "b"], "jpg": [web[0].image, web[1].image], "caption": ["é" * 600, "fine"]})
    pq.write_table(table, tmp_path / "long.parquet")
    samples, error = read_input(str(tmp_path / "long.parquet"))
    assert error is None
    assert [(s.key, s.status, s.text) for s in samples] == [
        ("a", "text_too_large", None),
        ("b", "ok", "fine"),
    ]
    assert "its caption is 1200 bytes, over the 1000-byte limit for a text" in samples[0].error_message
    assert clean_inputs.MAX_TEXT_BYTES == 2**20  # the job's limit; patched above for the table reader only
    nulls = pa.table({"jpg": [web[0].image], "caption": pa.nulls(1)})  # what pandas writes for all-None
    assert nulls.schema.field("caption").type == pa.null()
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    (sample,), error = read_input(str(tmp_path / "nulls.parquet"))
    assert error is None and sample.status == "ok" and sample.text is None


def test_an_input_path_with_glob_characters_is_that_path_when_it_exists(tmp_path: Path) -> None:
    from capfilt.data import input_files

    crawl = tmp_path / "crawl[2024]"
    crawl.mkdir()
    tar = _tar_with(crawl / "00000.tar", [("k.png", _png((1, 2, 3)))])
    assert input_files([str(crawl)]) == [str(tar)]
    assert input_files([str(tar)]) == [str(tar)]
    assert input_files([str(tmp_path / "crawl*" / "*.tar")]) == [str(tar)]  # a pattern still globs


def test_the_read_decode_and_write_stages_and_the_report_import_no_torch() -> None:
    """Ray workers that read and decode (a CPU's worth each) and the `--writers` processes load
    these modules alone: torch and the model code would cost each of them about 0.5 GB and seconds
    of start."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import capfilt.pipelines.clean_read, capfilt.pipelines.clean_tables, capfilt.pipelines.clean_report\n"
        "import capfilt.pipelines.clean_writers, capfilt.pipelines.clean_output\n"
        "print(sorted(m for m in ('torch', 'capfilt.model', 'capfilt.curate') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_decoding_rejects_a_sample_whatever_its_image_raises(monkeypatch) -> None:
    """The decode stage's last line of defence: an image that fails past `open_image` (here, its
    resize) is that row's image_undecodable, and the batch's other rows are decoded as ever."""
    from capfilt.pipelines import clean_read

    good = _png((5, 6, 7))
    batch = pa.table(
        {
            "key": ["a", "b"],
            "status": ["ok", "ok"],
            "error_message": pa.array([None, None], pa.string()),
            "image": [good, good],
        }
    )
    real = Image.Image.resize
    calls = iter([RuntimeError("a plugin's surprise"), None, None])

    def resize(self, *args, **kwargs):
        failure = next(calls, None)
        if failure is not None:
            raise failure
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    out = clean_read.decode_batch(batch, [4])
    assert out.column("status").to_pylist() == ["image_undecodable", "ok"]
    assert out.column("error_message").to_pylist() == [
        "a: cannot be resized (RuntimeError: a plugin's surprise)",
        None,
    ]
    assert (
        out.column("pixels_4").to_pylist()[0] is None
        and len(out.column("pixels_4").to_pylist()[1]) == 4 * 4 * 3
    )


@pytest.mark.parametrize(
    ("members", "cleaned_text"),
    [
        (["k.png", "k.png", "k.txt"], "first"),  # the text used to go to the duplicate
        (["k.png", "k.txt", "k.png", "k.txt"], "first"),
        (["k.txt", "k.png", "k.png"], "first"),
    ],
)
def test_a_repeated_member_starts_a_duplicate_and_the_first_sample_stays_whole(
    tmp_path: Path, members: list[str], cleaned_text: str
) -> None:
    texts = iter(["first", "second"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in members:
            data = _png((9, 9, 9)) if name.endswith(".png") else next(texts).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "dup.tar"
    path.write_bytes(buf.getvalue())
    samples, error = read_input(str(path))
    assert error is None
    assert [(s.key, s.status) for s in samples] == [("k", "ok"), ("k", "duplicate_key")]
    assert samples[0].text == cleaned_text and samples[0].image is not None


def test_a_parquet_that_declares_too_much_is_not_decompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compressed parquet can declare gigabytes of zeros in kilobytes (a 40 kB file of two 600 MB
    values made the reader peak at 6.8 GB). A row group whose footer declares more of a column than
    its rows may hold is not read: its rows are rejected as too large, by key. Within a row group
    that is read, a value over its limit is rejected by its Arrow length, before it becomes a
    Python object. The limits are scaled down here so the test needs no gigabytes."""
    from capfilt.pipelines import clean_tables

    monkeypatch.setattr(clean_tables, "MAX_IMAGE_BYTES", 4000)
    monkeypatch.setattr(clean_tables, "MAX_TEXT_BYTES", 4000)
    monkeypatch.setattr(clean_tables, "ROW_GROUP_COLUMN_BYTES", 100_000)
    png = _png((1, 2, 3))
    assert len(png) < 1000
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string())])

    def group(rows: list[tuple[str, bytes, str]]) -> pa.Table:
        return pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema)

    path = tmp_path / "bomb.parquet"
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        writer.write_table(group([("a", png, "fine"), ("b", png, "fine")]))
        writer.write_table(group([("c", b"\0" * 20000, "ok"), ("d", png, "x" * 20000)]))  # 10 kB a row: over
        rows = [(f"e{i}", png, "fine") for i in range(30)] + [("big", b"\0" * 3900, "y" * 5000)]
        writer.write_table(group(rows))  # within the average: read, one text over its limit
        writer.write_table(
            group([(f"f{i}", png, f"{i:03d}" + "z" * 3000) for i in range(40)])
        )  # 120 kB: over the cap
    samples, error = read_input(str(path))
    assert error is None
    status = {s.key: s.status for s in samples}
    assert [status[k] for k in ("a", "b")] == ["ok", "ok"]
    assert status["c"] == status["d"] == "image_too_large"  # the group: judged by its first column over
    said = next(s.error_message for s in samples if s.key == "c")
    assert "row group 1 declares" in said and "the row group was not read" in said
    assert status["big"] == "text_too_large" and all(status[f"e{i}"] == "ok" for i in range(30))
    big = next(s for s in samples if s.key == "big")
    assert big.text is None and big.image is None and "caption is 5000 bytes" in big.error_message
    assert {status[f"f{i}"] for i in range(40)} == {"text_too_large"}
    assert len(samples) == 2 + 2 + 31 + 40  # every row has its ledger row


def test_a_dotted_key_listed_in_the_sidecar_is_one_sample(tmp_path: Path) -> None:
    """`a.b.jpg` is key `a` to webdataset; the sidecar's success row `a.b` is that sample (before,
    it was a second ledger row, 'in the sidecar but not in the tar'). A sidecar key the tar lacks
    still gets its row."""
    shard = _tar_with(
        tmp_path / "00000.tar",
        [("a.b.jpg", _png((0, 0, 200))), ("a.b.txt", b"blue"), ("c.png", _png((9, 9, 9)))],
    )
    rows = [
        {"key": key, "status": "success", "error_message": None, "caption": "x", "url": "u"}
        for key in ("a.b", "c", "d.e")
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), tmp_path / "00000.parquet")
    samples, error = read_input(str(shard))
    assert error is None
    by_key = {s.key: s for s in samples}
    assert sorted(by_key) == ["a", "c", "d.e"] and len(samples) == 3
    assert by_key["a"].status == "missing_image" and "'b.jpg'" in by_key["a"].error_message
    assert by_key["c"].status == "ok"
    assert (
        by_key["d.e"].status == "missing_image" and "in the sidecar but not in" in by_key["d.e"].error_message
    )


def test_an_empty_table_key_is_an_invalid_key_and_takes_no_other_row_s_name(tmp_path: Path) -> None:
    """Before, an empty key got the name a null key gets (`{stem}_{row:09d}`), and the real row of
    that name became its duplicate."""
    png = _png((1, 2, 3))
    table = pa.table(
        {"key": ["", None, "t_000000000"], "png": [png] * 3, "caption": ["empty", "null", "real"]}
    )
    pq.write_table(table, tmp_path / "t.parquet")
    samples, _ = read_input(str(tmp_path / "t.parquet"))
    assert [(s.key, s.status) for s in samples] == [
        ("", "invalid_key"),
        ("t_000000001", "ok"),
        ("t_000000000", "ok"),
    ]
    assert samples[0].error_message == "row 0: empty key"


def test_tar_suffixes_in_upper_case_are_tars_with_their_sidecars(tmp_path: Path) -> None:
    """A directory of `00000.TAR` (a Windows copy, say) was refused as holding no tar shards."""
    shard = _tar_with(tmp_path / "00000.TAR", [("k.png", _png((5, 5, 5))), ("k.txt", b"grey")])
    rows = [
        {
            "key": "gone",
            "status": "failed_to_download",
            "error_message": "HTTP 404",
            "caption": "c",
            "url": "u",
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA), tmp_path / "00000.parquet")
    assert input_files([str(tmp_path)]) == input_files([str(tmp_path / "*")]) == [str(shard)]
    samples, error = read_input(str(shard))
    assert error is None and [(s.key, s.status) for s in samples] == [
        ("k", "ok"),
        ("gone", "failed_to_download"),
    ]
