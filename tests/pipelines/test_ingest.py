"""`capfilt ingest` end to end: the real img2dataset fetches a url list from a local HTTP server
(JPEGs, PNGs, a 404, an HTML page, a closed port) into webdataset shards, the real clean job then
accounts for every url in its ledger, a resume downloads only the unfinished shard, and the
errors a user can cause name the input before any download starts."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.errors import CapfiltError
from capfilt.ledger import read_ledger
from capfilt.pipelines.ingest import IngestConfig, IngestSummary, ingest
from capfilt.pipelines.ingest_cli import add_ingest_parser, run_ingest

pytestmark = pytest.mark.timeout(300)

THRESHOLD = 0.0222  # as in test_clean: the tiny random filter's p(match) lie in 0.020-0.023
SHARD_SIZE = 4  # 8 urls -> 2 shards, each with successes and failures
TIMEOUT_S = 5.0


def _image(fmt: str, size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


# path -> (content type, body); anything else is a 404.
ROUTES: dict[str, tuple[str, bytes]] = {
    "/red.jpg": ("image/jpeg", _image("JPEG", (48, 32), (200, 30, 30))),
    "/green.jpg": ("image/jpeg", _image("JPEG", (40, 40), (30, 200, 30))),
    "/blue.png": ("image/png", _image("PNG", (36, 24), (30, 30, 200))),
    "/gray.jpg": ("image/jpeg", _image("JPEG", (64, 48), (128, 128, 128))),
    "/clear.png": ("image/png", _image("PNG", (32, 32), (250, 200, 0, 128), mode="RGBA")),
    "/photo.jpg": ("text/html", b"<html><body>this is a page, not a picture</body></html>"),
}


@dataclass
class Site:
    """The local web: `url(path)` on the server; `closed` a url whose port refuses connections."""

    base: str
    closed: str
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            if self.path not in ROUTES:
                self.send_error(404, "File not found")
                return
            kind, body = ROUTES[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # keep the test output quiet
            pass

    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Site(f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{closed_port}/lost.jpg", requests)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def url_list(site: Site, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """8 urls with captions: 5 images, a 404, an HTML page and a closed port; written as parquet."""
    rows = [
        ("/red.jpg", "a red rectangle"),
        ("/missing.jpg", "a picture that is gone"),
        ("/blue.png", "a blue png"),
        ("/photo.jpg", "a page served as a photo"),
        ("/green.jpg", "a green square"),
        (None, "a server that is down"),
        ("/gray.jpg", "a gray rectangle"),
        ("/clear.png", "a half transparent yellow square"),
    ]
    return [{"url": site.url(p) if p else site.closed, "caption": c} for p, c in rows]


def _write_list(rows: list[dict[str, str]], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _no_proxy() -> Iterator[None]:
    """urllib in img2dataset honours *_proxy variables: never send 127.0.0.1 through one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield


@pytest.fixture(scope="module")
def fetched(
    site: Site, url_list: list[dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[IngestSummary, list[tuple[int, int, int]]]:
    """One ingest of the list, with the progress it reported."""
    base = tmp_path_factory.mktemp("ingest")
    config = IngestConfig(
        url_list=str(_write_list(url_list, base / "urls.parquet")),
        out=str(base / "shards"),
        shard_size=SHARD_SIZE,
        threads=4,
        timeout=TIMEOUT_S,
    )
    seen: list[tuple[int, int, int]] = []
    return ingest(config, lambda *a: seen.append(a)), seen


def _tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> extension -> bytes."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            handle = tar.extractfile(m)
            assert handle is not None
            members.setdefault(key, {})[ext] = handle.read()
    return members


def test_ingest_writes_img2dataset_shards_and_counts_failures(
    fetched, url_list: list[dict[str, str]]
) -> None:
    summary, seen = fetched
    out = summary.out
    assert (
        summary.complete and summary.shards_total == summary.shards_done == 2 and summary.shards_skipped == 0
    )
    assert (summary.count, summary.successes) == (8, 5) and summary.lost == {}
    assert (summary.failed_to_download, summary.failed_to_resize) == (2, 1)
    assert sum(summary.errors.values()) == 3 and summary.errors["Image decoding error"] == 1
    assert any("404" in e for e in summary.errors) and any("refused" in e.lower() for e in summary.errors)
    assert seen[-1] == (2, 2, 8)
    for name in ("00000", "00001"):
        stats = json.loads((out / f"{name}_stats.json").read_text())
        assert stats["count"] == SHARD_SIZE and stats["status_dict"]["success"] == stats["successes"]

    sidecar = pa.concat_tables([pq.read_table(out / f"{n}.parquet") for n in ("00000", "00001")]).to_pylist()
    assert sorted(r["url"] for r in sidecar) == sorted(r["url"] for r in url_list)
    captions = {r["url"]: r["caption"] for r in url_list}
    samples = {**_tar(out / "00000.tar"), **_tar(out / "00001.tar")}
    for row in sidecar:
        assert row["caption"] == captions[row["url"]]
        path = row["url"].rpartition("/")[2]
        if row["status"] != "success":  # in the sidecar only, with img2dataset's reason
            assert row["key"] not in samples and row["error_message"]
            assert row["status"] == ("failed_to_resize" if path == "photo.jpg" else "failed_to_download")
            continue
        files = samples[row["key"]]
        assert set(files) == {"jpg", "txt", "json"} and files["txt"].decode() == row["caption"]
        meta = json.loads(files["json"])
        assert meta["url"] == row["url"] and meta["status"] == "success" and meta["key"] == row["key"]
        served = ROUTES["/" + path][1]
        if path.endswith(".jpg"):  # a JPEG keeps the bytes it was served with
            assert files["jpg"] == served
        else:  # other formats become JPEG, same size
            image = Image.open(io.BytesIO(files["jpg"]))
            assert image.format == "JPEG" and image.size == Image.open(io.BytesIO(served)).size
    # keys: 5-digit shard number + 1 digit (ceil(log10(SHARD_SIZE))) for the row in its shard
    assert sorted(r["key"] for r in sidecar) == [f"0000{s}{i}" for s in range(2) for i in range(4)]


def test_clean_ledger_accounts_for_every_url(
    fetched, url_list, our_captioner_dir, our_filter_dir, tmp_path, ray_cluster
) -> None:
    from capfilt.pipelines.clean import CleanConfig, clean

    shards = fetched[0].out
    summary = clean(
        CleanConfig(
            inputs=[str(shards)],
            output=str(tmp_path / "clean"),
            captioner=str(our_captioner_dir),
            filter=str(our_filter_dir),
            threshold=THRESHOLD,
            batch_size=8,
        )
    )
    ledger = read_ledger(summary.output).to_pylist()
    assert sorted(r["url"] for r in ledger) == sorted(r["url"] for r in url_list)  # each url once
    assert len({r["key"] for r in ledger}) == 8
    sidecar = {
        r["key"]: r for n in ("00000", "00001") for r in pq.read_table(shards / f"{n}.parquet").to_pylist()
    }
    captions = {r["url"]: r["caption"] for r in url_list}
    for row in ledger:
        side = sidecar[row["key"]]
        assert row["url"] == side["url"] and row["web_text"] == captions[row["url"]]
        if side["status"] == "success":
            assert row["status"] == "ok" and row["web_itm"] is not None and len(row["synthetic"]) == 1
        else:
            assert row["status"] == row["reason"] == side["status"]
            assert row["error_message"] == side["error_message"] and row["web_itm"] is None
    assert summary.status == {"ok": 5, "failed_to_download": 2, "failed_to_resize": 1}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="capfilt")
    add_ingest_parser(parser.add_subparsers(dest="command", required=True))
    return run_ingest(parser.parse_args(["ingest", *argv]))


def test_cli_resume_downloads_only_unfinished_shards(fetched, site, tmp_path, capsys) -> None:
    first = fetched[0]
    out = tmp_path / "shards"
    shutil.copytree(first.out, out)
    (out / "00001_stats.json").unlink()  # as if the run had been killed during shard 1
    url_list = json.loads((out / "_ingest" / "job.json").read_text())["url_list"]
    before = len(site.requests)
    args = ["--url-list", url_list, "--out", str(out), "--threads", "4", "--timeout", str(TIMEOUT_S)]

    with pytest.raises(CapfiltError, match=r"--out .* is not empty; pass --resume"):
        _cli([*args, "--shard-size", str(SHARD_SIZE)])
    with pytest.raises(CapfiltError, match=r"started with other arguments \(shard_size: saved 4, now 3\)"):
        _cli([*args, "--shard-size", "3", "--resume"])
    assert len(site.requests) == before  # no download before the inputs were checked

    assert _cli([*args, "--shard-size", str(SHARD_SIZE), "--resume"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] and printed["shards_skipped"] == 1 and printed["shards_done"] == 2
    assert (printed["urls"], printed["successes"], printed["failed_to_download"]) == (8, 5, 2)
    # shard 1 (urls 4-7, one of them on the closed port) was fetched again, shard 0 was not
    assert sorted(site.requests[before:]) == ["/clear.png", "/gray.jpg", "/green.jpg"]
    assert _tar(out / "00001.tar").keys() == _tar(first.out / "00001.tar").keys()

    log_size = (out / "_ingest" / "img2dataset.log").stat().st_size
    assert _cli([*args, "--shard-size", str(SHARD_SIZE), "--resume"]) == 0  # all done: img2dataset not run
    printed = json.loads(capsys.readouterr().out)
    assert printed["shards_skipped"] == 2 and printed["urls"] == 8 and printed["errors"] == first.errors
    assert (out / "_ingest" / "img2dataset.log").stat().st_size == log_size

    # A url list whose rows changed would put other rows in the unfinished shards: refused.
    moved = tmp_path / "moved.parquet"
    shutil.copy(url_list, moved)
    job = json.loads((out / "_ingest" / "job.json").read_text())
    job["url_list"] = job["url_files"][0]["path"] = str(moved)
    (out / "_ingest" / "job.json").write_text(json.dumps(job))
    moved_args = [*args[:1], str(moved), *args[2:], "--shard-size", str(SHARD_SIZE), "--resume"]
    assert _cli(moved_args) == 0  # the same rows: resumes (nothing left to do)
    capsys.readouterr()
    rows = pq.read_table(moved).to_pylist()
    pq.write_table(pa.Table.from_pylist([rows[1], rows[0], *rows[2:]]), moved)
    with pytest.raises(CapfiltError, match=r"the url list's contents changed since"):
        _cli(moved_args)


def test_user_errors_name_the_input(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "header_only.csv").write_text("url,caption\n")
    (tmp_path / "links.csv").write_text("link,caption\nhttp://x/a.jpg,an a\n")
    (tmp_path / "nocaps.tsv").write_text("url\talt\nhttp://x/a.jpg\tan a\n")
    (tmp_path / "urls.xml").write_text("<urls/>")
    (tmp_path / "latin1.csv").write_bytes(b"url,caption\nhttp://x/a.jpg,caf\xe9\nhttp://x/b.jpg,tea\n")
    (tmp_path / "dates.csv").write_text("url,caption\nhttp://x/a.jpg,2020-01-01\n")
    (tmp_path / "alt.csv").write_text("url,caption,alt\nhttp://x/a.jpg,a,an a\n")
    (tmp_path / "both.csv").write_text("link,url,caption\nhttp://x/a.jpg,http://x/b.jpg,an a\n")
    cases = [
        (["--url-list", str(tmp_path / "nope.parquet")], r"--url-list .*nope\.parquet does not exist"),
        (["--url-list", str(tmp_path / "empty.txt")], r"--url-list .*empty\.txt holds no urls"),
        (["--url-list", str(tmp_path / "header_only.csv")], r"header_only\.csv holds no urls"),
        (
            ["--url-list", str(tmp_path / "links.csv")],
            r"links\.csv has no column 'url' \(it has: link, caption\)",
        ),
        (["--url-list", str(tmp_path / "nocaps.tsv")], r"nocaps\.tsv has no column 'caption'.*--no-captions"),
        (["--url-list", str(tmp_path / "urls.xml")], r"urls\.xml: cannot tell its format.*--input-format"),
        (["--url-list", str(tmp_path), "--input-format", "jsonl"], r"directory without \*\.jsonl files"),
        (
            ["--url-list", str(tmp_path / "links.csv"), "--keep-bytes", "--resize-mode", "keep_ratio"],
            r"--keep-bytes .* excludes --resize-mode keep_ratio",
        ),
        (["--url-list", str(tmp_path / "links.csv"), "--threads", "0"], r"--threads must be >= 1; got 0"),
        # img2dataset would drop every downloaded sample of these while counting it a success
        (
            ["--url-list", str(tmp_path / "latin1.csv")],
            r"column 'caption' is read as bytes that are not UTF-8",
        ),
        (["--url-list", str(tmp_path / "dates.csv")], r"column 'caption' is read as date32\[day\] values"),
        # ... and rename these onto a column the list already has (it crashed after minutes of retries)
        (
            ["--url-list", str(tmp_path / "alt.csv"), "--caption-col", "alt"],
            r"renames column 'alt' to 'caption', which the list also has",
        ),
        (
            ["--url-list", str(tmp_path / "both.csv"), "--url-col", "link"],
            r"renames column 'link' to 'url', which the list also has",
        ),
        (
            ["--url-list", str(tmp_path / "links.csv"), "--url-col", "link", "--deadline", "1"],
            r"--deadline must be at least --timeout \(10 s\); got 1",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(CapfiltError, match=message):
            _cli([*argv, "--out", str(out)])
    assert not out.exists()  # nothing was created for a bad input

    full = ["--url-list", str(tmp_path / "links.csv"), "--url-col", "link", "--out", str(tmp_path / "full")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "00000.tar").write_bytes(b"")
    with pytest.raises(CapfiltError, match=r"--out .*full is not empty; pass --resume"):
        _cli(full)
    with pytest.raises(CapfiltError, match=r"full holds files but no _ingest/job\.json"):
        _cli([*full, "--resume"])


def test_cli_flags_map_onto_the_config_without_importing_torch() -> None:
    code = (
        "import argparse, sys\n"
        "from capfilt.pipelines.ingest_cli import add_ingest_parser, config_from_args\n"
        "p = argparse.ArgumentParser(); add_ingest_parser(p.add_subparsers())\n"
        "c = config_from_args(p.parse_args(['ingest', '--url-list', 'u.csv', '--out', 'o', '--no-captions',"
        " '--resize-mode', 'keep_ratio', '--processes', '2', '--deadline', '30', '--max-bytes', '1000']))\n"
        "assert 'torch' not in sys.modules, 'ingest must not import torch'\n"
        "print(c.caption_col, c.resize_mode, c.image_size, c.processes, c.threads, c.keep_bytes, c.resume,"
        " c.deadline, c.max_bytes)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "keep_ratio", "384", "2", "16", "False", "False", "30.0", "1000"]


def test_successes_missing_from_their_tar_are_reported(tmp_path: Path) -> None:
    """img2dataset counts a sample a success before writing it, and drops it if the write fails:
    the summary compares each shard's count with its tar."""
    from capfilt.pipelines.ingest import lost_samples

    for name, successes, keys in (("00000", 2, ["000000", "000001"]), ("00001", 3, ["000010"])):
        (tmp_path / f"{name}_stats.json").write_text(json.dumps({"successes": successes}))
        with tarfile.open(tmp_path / f"{name}.tar", "w") as tar:
            for key in keys:
                for ext in ("jpg", "txt", "json"):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"x"))
    assert lost_samples(tmp_path, ["00000", "00001"]) == {"00001": 2}
