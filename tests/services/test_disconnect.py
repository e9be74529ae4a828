"""A client that hangs up has its work cancelled, and a full model queue answers 503 at once.

The middleware and the router are driven directly here (no Ray, no sockets); the running service's
behaviour under abandoned requests is in test_abandoned.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from capfilt.services.actors import CAPTIONER, ModelBusy, ModelPool
from capfilt.services.disconnect import CancelOnDisconnect

PATH = "/v1/caption"


def _scope(path: str = PATH) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": []}


class _Client:
    """The server side of one connection: the body, then (when told) a disconnect."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.body_given = False

    async def receive(self) -> dict[str, Any]:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def _slow_app(log: list[str], seconds: float) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        try:
            await asyncio.sleep(seconds)  # the model's work
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        log.append("finished")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _interrupted(how: str) -> tuple[list[str], list[dict[str, Any]]]:
    """A watched request whose 30 s of work is interrupted after 50 ms: its client leaves ("leave"),
    or the server cancels it ("cancel", as uvicorn at the end of its graceful shutdown). Returns
    what the work logged and what was sent."""

    async def run() -> tuple[list[str], list[dict[str, Any]]]:
        log: list[str] = []
        client = _Client()
        middleware = CancelOnDisconnect(_slow_app(log, 30), frozenset({PATH}))
        served = asyncio.ensure_future(middleware(_scope(), client.receive, client.send))
        await asyncio.sleep(0.05)
        if how == "leave":
            client.leave.set()
        else:
            served.cancel()
        await asyncio.wait_for(served, 5)
        return log, client.sent

    return asyncio.run(run())


def test_a_client_that_leaves_has_its_work_cancelled_and_counted_as_499() -> None:
    log, sent = _interrupted("leave")
    assert log == ["cancelled"]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499


def test_a_client_that_stays_gets_its_answer_and_others_paths_are_not_watched() -> None:
    async def run(path: str, leave: bool) -> tuple[list[str], list[dict[str, Any]]]:
        log: list[str] = []
        client = _Client()
        if leave:
            client.leave.set()  # a job submission whose client left still runs to its end
        middleware = CancelOnDisconnect(_slow_app(log, 0.05), frozenset({PATH}))
        await asyncio.wait_for(middleware(_scope(path), client.receive, client.send), 5)
        return log, client.sent

    log, sent = asyncio.run(run(PATH, leave=False))
    assert log == ["finished"] and sent[0]["status"] == 200 and sent[1]["body"] == b"ok"
    log, sent = asyncio.run(run("/v1/jobs", leave=True))
    assert log == ["finished"] and sent[0]["status"] == 200


class _Method:
    def __init__(self, release: asyncio.Event) -> None:
        self.release = release
        self.calls = 0

    def remote(self, item: Any) -> Any:
        self.calls += 1

        async def answer() -> str:
            await self.release.wait()
            return "a caption"

        return asyncio.ensure_future(answer())


class _Actor:
    def __init__(self, release: asyncio.Event) -> None:
        self.submit = _Method(release)


def test_a_full_queue_answers_busy_at_once_and_frees_as_requests_finish() -> None:
    async def run() -> None:
        release = asyncio.Event()
        actors = [_Actor(release), _Actor(release)]
        pool = ModelPool.__new__(ModelPool)  # the router alone: no Ray actors behind it
        pool.actors, pool.max_queue = {CAPTIONER: actors}, 3
        pool.in_flight, pool._down = {CAPTIONER: [0, 0]}, {}
        waiting = [asyncio.ensure_future(pool.call(CAPTIONER, None)) for _ in range(6)]  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert [a.submit.calls for a in actors] == [3, 3]  # spread over the replicas
        with pytest.raises(ModelBusy, match=r"3 requests waiting on each of its 2 replicas \(--max-queue\)"):
            await pool.call(CAPTIONER, None)  # type: ignore[arg-type]
        release.set()
        assert await asyncio.gather(*waiting) == ["a caption"] * 6
        assert await pool.call(CAPTIONER, None) == "a caption"  # type: ignore[arg-type]

    asyncio.run(run())


def test_decodes_of_requests_whose_clients_left_stay_within_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Image decodes run in a pool of 4 threads: a request cancelled (its client left) while its
    decode waits never decodes, and one cancelled mid-decode still holds its thread. With anyio's
    limiter a cancelled caller gave its slot back while its thread went on decoding."""
    import threading
    import time

    from capfilt.services import requests as requests_module

    lock = threading.Lock()
    running, most, started = 0, 0, 0

    def slow_decode(data: bytes, max_pixels: int, sizes: list[int]) -> dict[int, bytes]:
        nonlocal running, most, started
        with lock:
            running, started = running + 1, started + 1
            most = max(most, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return {size: b"" for size in sizes}

    monkeypatch.setattr(requests_module, "_pixels", slow_decode)

    async def run() -> None:
        for _ in range(3):  # waves of clients that leave while their images decode or wait
            wave = [asyncio.ensure_future(requests_module.image_pixels(b"x", 10, [8])) for _ in range(8)]
            await asyncio.sleep(0.05)
            for task in wave:
                task.cancel()
        await asyncio.sleep(1.0)  # the decodes under way finish
        assert await requests_module.image_pixels(b"x", 10, [8]) == {8: b""}

    asyncio.run(run())
    assert most <= 4, f"{most} decodes at once"
    assert started <= 4 + 1, f"{started} decodes started for 24 abandoned requests and 1 kept"


@pytest.mark.parametrize(
    ("sends", "says"),
    [
        ([b"x" * 10], "no bytes for 0.5 s"),  # part of the body, then nothing
        ([b"x"] * 20, "not whole after 1.5 s"),  # a byte every 0.2 s: never idle, never done
    ],
    ids=["stalled", "trickled"],
)
def test_a_body_that_stalls_or_trickles_is_answered_408(
    monkeypatch: pytest.MonkeyPatch, sends: list[bytes], says: str
) -> None:
    """uvicorn waits for a body's next bytes without end: a client sending a byte now and then held
    its connection for ever. A body idle for BODY_IDLE_S or not whole after BODY_TOTAL_S is a 408."""
    import json
    import socket
    import time

    from capfilt.services import limits
    from capfilt.services.app import create_app
    from capfilt.services.bench import LoopbackServer
    from capfilt.services.config import ServeConfig

    monkeypatch.setattr(limits, "BODY_IDLE_S", 0.5)
    monkeypatch.setattr(limits, "BODY_TOTAL_S", 1.5)
    from capfilt.services.deps import get_models

    app = create_app(ServeConfig(captioner="unused", filter="unused"), None, None)
    app.dependency_overrides[get_models] = lambda: None  # the body is read before a model is asked
    with (
        LoopbackServer(app) as url,
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock,
    ):
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head.encode())
        started = time.monotonic()
        sock.settimeout(0.2)
        answer = b""
        for chunk in sends:
            try:
                sock.sendall(chunk)
                answer += sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:  # the server answered and closed
                break
        sock.settimeout(10)
        while not answer.endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["reason"] == "body_timeout" and says in body["detail"]
    assert time.monotonic() - started < 5


def test_a_request_cut_by_the_servers_shutdown_is_a_503_not_a_500() -> None:
    """uvicorn cancels the requests still running when its graceful shutdown runs out, and answers
    those unanswered 500 with a traceback: a watched request answers 503 shutting_down instead."""
    log, sent = _interrupted("cancel")
    assert log == ["cancelled"]
    assert sent[0]["status"] == 503 and b'"reason":"shutting_down"' in sent[1]["body"]
