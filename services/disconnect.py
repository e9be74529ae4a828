"""Work for a client that has hung up is cancelled, not finished for nobody.

uvicorn tells an app that its client is gone only through `receive()` (an `http.disconnect`
message), and an endpoint that has read its body never calls it again: without this middleware a
caption request whose client left still waits its turn in a model actor's queue and runs its
forward pass. Here, once the body is read, a watcher waits on `receive()`; when the client
disconnects before the answer is sent, the endpoint's task is cancelled (`ModelPool.call` then
cancels its request in the actor), and the request is counted as a 499.

Only the routes in `paths` are watched: the inference endpoints, whose work is only for the
client. A job submission goes on to the end whatever its client does: half of one is worse.

When the server stops and its graceful shutdown runs out before such a request is answered, the
request is answered 503 `shutting_down` (retry elsewhere) rather than uvicorn's 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class CancelOnDisconnect:
    """Pure ASGI middleware: cancel a watched request's handler when its client disconnects."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        gone = asyncio.Event()
        started = False

        async def app_receive() -> Message:
            if body_read.is_set():  # asked again after the body: answered when the client leaves
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(watch())
        stopping = False
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
            if handler.done() or started:  # answered (uvicorn reports a disconnect once it has)
                await handler
                return
        except asyncio.CancelledError:
            if started:
                raise
            stopping = True  # the server stops, and its graceful shutdown ran out before this answer
        finally:
            for task in (watcher, handler):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if stopping:
            # a 503 the client can retry elsewhere, where uvicorn would answer a 500 and log a traceback
            log.warning("shutting down: %s %s was cancelled unanswered", scope["method"], scope["path"])
            stopped = JSONResponse(
                {"detail": "the service is shutting down; retry", "reason": "shutting_down"},
                status_code=503,
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await stopped(scope, receive, send)
            return
        log.info(
            "client disconnected while waiting on %s %s: its work was cancelled",
            scope["method"],
            scope["path"],
        )
        # nobody reads this; it is what the metrics and the access log count (nginx's 499)
        response = JSONResponse(
            {
                "detail": "the client closed the request before it was answered",
                "reason": "client_closed_request",
            },
            status_code=499,
        )
        await response(scope, receive, send)
