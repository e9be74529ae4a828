"""The fetch img2dataset's download workers run for `capfilt ingest`, with the limits it lacks.

img2dataset fetches a url with `urllib.request.urlopen(url, timeout)` and buffers the whole body.
That opens any scheme urllib knows (`file:///etc/passwd` became a sample), bounds each socket read
but not the request (a server sending a byte a second held a shard forever), reads bodies of any
size (three 2 GB answers took 6 GB), and decodes any image (a 2.6 MB PNG of 30000 x 30000 pixels
took 2.7 GB and was stored). Here, each url:

- is fetched only over http or https, and redirects only to http or https;
- is sent percent-encoded where it holds spaces or other characters a request line cannot carry
  (web alt-text datasets hold such urls: urllib refused them, and their images were lost), with
  a non-ASCII host name in IDNA;
- gets `deadline_s` in all, its body read in chunks against that deadline;
- may carry at most `max_bytes` (a Content-Length above it is refused before any body is read);
- is refused when its image header declares more than MAX_PIXELS pixels.

Each refusal is the url's error message in the shard's parquet and `_stats.json`, as img2dataset's
own failures are. `SafeDownloader` carries the limits to the worker processes (img2dataset's pool
spawns them): unpickling it there imports this module, which puts `download_image` in place of
img2dataset's in that process.

img2dataset writes a shard's statistics only when the shard is done; a worker here also keeps
`OUT/_ingest/progress/NNNNN` up to date (the urls of shard NNNNN answered so far, at most every
PROGRESS_S), so that progress moves within a shard (`ingest.read_progress`).
"""

from __future__ import annotations

import io
import os
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations would ask PyPI

from img2dataset import downloader as _img2dataset
from PIL import Image

from capfilt.images import MAX_PIXELS  # the decoder's own limit (no torch: a worker needs none)

SCHEMES = ("http", "https")
CHUNK = 1 << 16
LIMITS: dict[str, float] = {"max_bytes": 64 * 2**20, "deadline_s": 60.0}  # set by SafeDownloader
PROGRESS = ("_ingest", "progress")  # under OUT: a file per shard being downloaded
PROGRESS_S = 0.5
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's


class _Refused(Exception):
    """A url this fetch will not (or can no longer) read: the message is its recorded error."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in SCHEMES:
            raise _Refused(f"redirected to a {scheme or 'schemeless'} url: only http and https are fetched")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def fetch(url: str, timeout: float, user_agent: str = USER_AGENT) -> tuple[bytes | None, Any, str | None]:
    """(body, headers, None) or (None, None, why)."""
    max_bytes, deadline_s = int(LIMITS["max_bytes"]), float(LIMITS["deadline_s"])
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in SCHEMES:
            raise _Refused(f"unsupported url scheme {scheme or '(none)'!r}: only http and https are fetched")
        deadline = time.monotonic() + deadline_s
        request = urllib.request.Request(quoted(url), data=None, headers={"User-Agent": user_agent})
        with _OPENER.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                raise _Refused(f"body of {int(declared)} bytes is over the limit of {max_bytes}")
            body = bytearray()
            while chunk := response.read1(CHUNK):  # what has arrived: read() would wait for CHUNK bytes
                body += chunk
                if len(body) > max_bytes:
                    raise _Refused(f"body is over the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _Refused(f"timed out: the body took longer than {deadline_s:g} s")
            headers = response.headers
        data = bytes(body)
        _check_pixels(data)
        return data, headers, None
    except _Refused as err:
        return None, None, str(err)
    except Exception as err:  # every failure is this url's recorded error, as in img2dataset
        return None, None, str(err)


# What a url may hold unescaped (RFC 3986's reserved and unreserved characters, and `%`, so that
# existing escapes are kept as they are).
_SAFE = "/?#[]@!$&'()*+,;=:%~-._"


def quoted(url: str) -> str:
    """`url` with spaces, controls and non-ASCII characters percent-encoded (UTF-8), and a non-ASCII
    host in IDNA; an ASCII url without spaces is returned as it is."""
    if url.isascii() and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return url
    parts = urllib.parse.urlsplit(url.strip())
    netloc = parts.netloc
    if not netloc.isascii():
        host = parts.hostname or ""
        ascii_host = host.encode("idna").decode("ascii")
        netloc = netloc.replace(host, ascii_host) if host in netloc else netloc
    return urllib.parse.urlunsplit(
        (
            parts.scheme,
            urllib.parse.quote(netloc, safe=_SAFE),
            urllib.parse.quote(parts.path, safe=_SAFE),
            urllib.parse.quote(parts.query, safe=_SAFE),
            urllib.parse.quote(parts.fragment, safe=_SAFE),
        )
    )


def _check_pixels(body: bytes) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS; a body PIL cannot identify passes
    (img2dataset's decoder then records it as failed_to_resize, or --keep-bytes stores it)."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise _Refused(f"image over the limit of {MAX_PIXELS} pixels ({err})") from err
    except Exception:  # not an image PIL knows: not this check's to judge
        return
    if width * height > MAX_PIXELS:
        raise _Refused(f"image of {width}x{height} pixels is over the limit of {MAX_PIXELS}")


def download_image(row: Any, timeout: float, user_agent_token: Any, disallowed_header_directives: Any) -> Any:
    """img2dataset's `download_image`, through `fetch`: -> (key, BytesIO or None, error or None)."""
    key, url = row
    agent = USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    body, headers, error = fetch(url, timeout, agent)
    _PROGRESS.one()
    if body is None:
        return key, None, error
    if disallowed_header_directives and _img2dataset.is_disallowed(
        headers, user_agent_token, disallowed_header_directives
    ):
        return key, None, "Use of image disallowed by X-Robots-Tag directive"
    return key, io.BytesIO(body), None


class _ShardProgress:
    """The urls of this worker's current shard answered so far, written to its progress file every
    PROGRESS_S by a thread of its own (the download threads only count)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.count = 0
        self.stop = threading.Event()
        self.writer: threading.Thread | None = None

    def start(self, path: Path) -> None:
        with self.lock:
            self.path, self.count = path, 0
        self._write()
        self.stop.clear()
        self.writer = threading.Thread(target=self._keep_writing, daemon=True)
        self.writer.start()

    def one(self) -> None:
        with self.lock:
            self.count += 1

    def finish(self) -> None:
        self.stop.set()
        if self.writer is not None:
            self.writer.join()
        self._write()

    def _keep_writing(self) -> None:
        while not self.stop.wait(PROGRESS_S):
            self._write()

    def _write(self) -> None:
        with self.lock:
            path, count = self.path, self.count
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")
            partial.write_text(str(count))
            partial.replace(path)  # a reader never sees half a number
        except OSError:  # progress is a courtesy: never a reason to fail a download
            pass


_PROGRESS = _ShardProgress()


def install() -> None:
    """Make img2dataset's workers in this process fetch through `download_image`."""
    _img2dataset.download_image = download_image


class SafeDownloader(_img2dataset.Downloader):
    """img2dataset's Downloader, carrying `limits` to the processes that unpickle it."""

    def __init__(self, *args: Any, limits: dict[str, float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = dict(limits)
        LIMITS.update(self.limits)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        LIMITS.update(state["limits"])

    def download_shard(self, row: Any) -> Any:
        shard_id = row[0]
        _PROGRESS.start(Path(self.output_folder, *PROGRESS, f"{shard_id:0{self.oom_shard_count}d}"))
        try:
            return super().download_shard(row)
        finally:
            _PROGRESS.finish()


install()  # on import: in the child that runs img2dataset and in every worker it spawns
