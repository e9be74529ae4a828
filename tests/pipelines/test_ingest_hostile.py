"""`capfilt ingest` against a hostile web (a local HTTP server): only http and https are fetched,
redirects included; a url gets a deadline in all and a body-size limit; an image whose header
declares a decompression bomb is refused before decoding. Each refusal is that url's recorded
failure; the rest of the shard is downloaded."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipelines import ingest_fetch
from capfilt.pipelines.ingest import IngestConfig, ingest

from .test_ingest import ROUTES, _tar

pytestmark = pytest.mark.timeout(300)
MAX_BYTES = 100_000
DEADLINE_S = 3.0


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (no pixel data: enough for a bomb check)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    secret = tmp_path_factory.mktemp("local") / "secret.jpg"
    secret.write_bytes(ROUTES["/red.jpg"][1])  # a real image: would become a sample if read

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow.jpg":  # answers after a while: the shard stays open meanwhile
                time.sleep(4 * ingest_fetch.PROGRESS_S + 1)
                self._send(ROUTES["/red.jpg"][1])
            elif self.path in ("/ok.jpg", "/h%C3%A9llo%20world.jpg") or self.path.startswith("/ok.jpg?"):
                self._send(ROUTES["/red.jpg"][1])
            elif self.path == "/bomb.png":
                self._send(_png_header(9000, 9000), "image/png")  # 81 M pixels
            elif self.path == "/declared_huge.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(50 * MAX_BYTES))
                self.end_headers()  # and never send it
            elif self.path == "/streamed_huge.jpg":  # no Content-Length: read until the limit
                self.send_response(200)
                self.end_headers()
                for _ in range(20):
                    self.wfile.write(b"\xff" * MAX_BYTES)
            elif self.path == "/trickle.jpg":  # a byte at a time: each read is quick, the body never ends
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(int(600 / 0.25)):  # ten minutes
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.25)
            elif self.path in ("/to_file.jpg", "/to_ftp.jpg"):
                self.send_response(302)
                self.send_header(
                    "Location", secret.as_uri() if "file" in self.path else "ftp://127.0.0.1:1/x.jpg"
                )
                self.end_headers()
            else:
                self.send_error(404)

        def _send(self, body: bytes, kind: str = "image/jpeg") -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", secret
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_hostile_urls_are_failures_with_reasons_and_local_files_are_never_read(
    hostile_site: tuple[str, Path], tmp_path: Path
) -> None:
    base, secret = hostile_site
    urls = {
        "ok": f"{base}/ok.jpg",
        "unicode": f"{base}/héllo world.jpg",  # sent percent-encoded (urllib refused it)
        "file": secret.as_uri(),
        "data": "data:image/jpeg;base64,/9j/4AAQ",
        "ftp": "ftp://127.0.0.1:1/x.jpg",
        "to_file": f"{base}/to_file.jpg",
        "to_ftp": f"{base}/to_ftp.jpg",
        "bomb": f"{base}/bomb.png",
        "declared_huge": f"{base}/declared_huge.jpg",
        "streamed_huge": f"{base}/streamed_huge.jpg",
        "trickle": f"{base}/trickle.jpg",
    }
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist([{"url": u, "caption": name} for name, u in urls.items()]), url_list)
    config = IngestConfig(
        url_list=str(url_list),
        out=str(tmp_path / "out"),
        threads=len(urls),
        timeout=2.0,
        deadline=DEADLINE_S,
        max_bytes=MAX_BYTES,
    )
    start = time.monotonic()
    summary = ingest(config)
    assert time.monotonic() - start < 60  # the trickle alone would take ten minutes
    assert summary.complete and summary.count == len(urls) and summary.successes == 2
    rows = {r["caption"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}
    assert set(rows) == set(urls)
    expected = {
        "file": "unsupported url scheme 'file'",
        "data": "unsupported url scheme 'data'",
        "ftp": "unsupported url scheme 'ftp'",
        "to_file": "is not allowed",  # urllib's own refusal, before ours
        "to_ftp": "redirected to a ftp url",
        "bomb": "image of 9000x9000 pixels is over the limit of 64000000",
        "declared_huge": f"body of {50 * MAX_BYTES} bytes is over the limit of {MAX_BYTES}",
        "streamed_huge": f"body is over the limit of {MAX_BYTES} bytes",
        "trickle": f"timed out: the body took longer than {DEADLINE_S:g} s",
    }
    for name, reason in expected.items():
        assert rows[name]["status"] == "failed_to_download", name
        assert reason in rows[name]["error_message"], (name, rows[name]["error_message"])
    assert rows["ok"]["status"] == rows["unicode"]["status"] == "success"
    samples = _tar(tmp_path / "out" / "00000.tar")
    assert sorted(s["txt"] for s in samples.values()) == [b"ok", b"unicode"]  # never the local file's image


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("http://x.org/ok.jpg?a=1&b=%20", "http://x.org/ok.jpg?a=1&b=%20"),  # as it is
        ("http://x.org/a b.jpg", "http://x.org/a%20b.jpg"),
        ("http://x.org/h\u00e9llo.jpg?q=caf\u00e9", "http://x.org/h%C3%A9llo.jpg?q=caf%C3%A9"),
        ("http://b\u00fccher.de/a%20b.jpg", "http://xn--bcher-kva.de/a%20b.jpg"),
        ("https://u@x.org:8080/\u65e5.png#f", "https://u@x.org:8080/%E6%97%A5.png#f"),
    ],
)
def test_urls_are_sent_percent_encoded(url: str, sent: str) -> None:
    assert ingest_fetch.quoted(url) == sent


def test_the_pixel_limit_is_the_clean_jobs() -> None:
    from capfilt.images import MAX_PIXELS

    assert ingest_fetch.MAX_PIXELS == MAX_PIXELS


def test_sigterm_stops_img2dataset_too_and_says_how_to_resume(
    hostile_site: tuple[str, Path], tmp_path: Path
) -> None:
    """img2dataset runs in its own session, so a SIGTERM to `capfilt ingest` never reaches it: the
    CLI must stop it (it used to exit and leave img2dataset writing into OUT)."""
    import signal
    import subprocess
    import sys

    base, _ = hostile_site
    url_list = tmp_path / "urls.txt"
    url_list.write_text(f"{base}/trickle.jpg\n")
    out = tmp_path / "out"
    argv = [
        "-m",
        "capfilt.cli",
        "ingest",
        "--url-list",
        str(url_list),
        "--out",
        str(out),
        "--deadline",
        "600",
    ]
    proc = subprocess.Popen([sys.executable, *argv], stderr=subprocess.PIPE, text=True)
    log = out / "_ingest" / "img2dataset.log"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "Starting the downloading" in log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, "img2dataset did not start"
        time.sleep(0.2)
    children = _processes_naming(str(out))
    assert children  # img2dataset's processes (their arguments name OUT)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    said = " ".join(stderr.split())
    assert f"ingest stopped by SIGTERM: 0 of 1 shards are finished in {out}" in said
    assert "rerun the same command with --resume" in said
    # The CLI waits for the whole group; zombies (orphans PID 1 may never reap) do not run.
    deadline = time.monotonic() + 10
    while alive := [pid for pid in children if _running(pid)]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not alive, f"img2dataset's processes outlived ingest: {alive}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _processes_naming(text: str) -> list[int]:
    """Processes whose command line holds `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_progress_moves_within_a_shard(hostile_site: tuple[str, Path], tmp_path: Path) -> None:
    """img2dataset writes a shard's statistics only at its end; the urls answered before that are
    reported as they come (a 10,000-url shard used to show 0 until it was done)."""
    base, _ = hostile_site
    url_list = tmp_path / "urls.txt"
    url_list.write_text("".join(f"{base}/ok.jpg?{i}\n" for i in range(5)) + f"{base}/slow.jpg\n")
    seen: list[tuple[int, int, int]] = []
    summary = ingest(
        IngestConfig(url_list=str(url_list), out=str(tmp_path / "out"), threads=6), lambda *a: seen.append(a)
    )
    assert summary.complete and summary.successes == 6
    assert (0, 1, 5) in seen  # the five quick urls, while the slow one held the shard open
    assert seen[-1] == (1, 1, 6)


def test_stopping_img2dataset_waits_for_its_whole_group_and_ignores_zombies() -> None:
    """`_stop` returns once no member of the group runs: a live worker holds it (and is killed),
    an orphan that exited (a zombie where PID 1 does not reap) does not."""
    import subprocess

    from capfilt.pipelines.ingest import _group_alive, _stop

    # A worker that outlives its parent and ignores SIGTERM, as a busy pool worker may.
    proc = subprocess.Popen(
        ["bash", "-c", "(trap '' TERM; sleep 60) & (sleep 0.1) & wait -n; exit 0"],
        start_new_session=True,
    )
    proc.wait(timeout=10)
    assert _group_alive(proc.pid)  # the trapping worker runs on after its parent exited
    started = time.monotonic()
    _stop(proc, term_s=0.5)
    assert not _group_alive(proc.pid)
    assert time.monotonic() - started < 5  # SIGTERM ignored, so SIGKILL after half a second
