"""The request body limit (`--max-body-bytes`): a body over it is refused with a 413 whose JSON names
the limit, before it is read when Content-Length says so, else as soon as the bytes received pass it.

Starlette has a body limiter too, but it answers in plain text from outside the app's exception
handlers; this one raises an HTTPException inside the app, so the 413 looks like every other error.

It also bounds how long a body may take: uvicorn waits for the next bytes of a body without end,
so a client sending a byte now and then holds its connection and its buffer for ever. A body whose
next bytes do not come within BODY_IDLE_S, or that is not whole BODY_TOTAL_S after its first
bytes were asked for, is answered 408 (slow headers are a proxy's job: docs/service.md).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_IDLE_S = 30.0  # the longest wait for a request body's next bytes
BODY_TOTAL_S = 300.0  # the longest a whole body may take (16 MiB at 0.5 Mbit/s)


class BodyStalled(HTTPException):
    reason = "body_timeout"

    def __init__(self, why: str) -> None:
        super().__init__(408, f"the request body came too slowly: {why}", {"Connection": "close"})


class BodyTooLarge(HTTPException):
    """A body over the limit, declared or counted; `reason` goes in the 413's JSON either way."""

    reason = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Pure ASGI middleware: at most `max_bytes` of request body per HTTP request."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, idle_s: float = BODY_IDLE_S, total_s: float = BODY_TOTAL_S
    ) -> None:
        self.app, self.max_bytes, self.idle_s, self.total_s = app, max_bytes, idle_s, total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            response = JSONResponse({"detail": error.detail, "reason": error.reason}, status_code=413)
            await response(scope, receive, send)
            return
        received, whole, deadline = 0, False, None

        async def limited() -> Message:
            nonlocal received, whole, deadline
            if whole:  # after the body: the wait for a disconnect has no limit
                return await receive()
            now = time.monotonic()
            deadline = deadline or now + self.total_s
            wait = min(self.idle_s, deadline - now)
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                why = (
                    f"no bytes for {self.idle_s:g} s"
                    if wait == self.idle_s
                    else f"not whole after {self.total_s:g} s"
                )
                raise BodyStalled(why) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                whole = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)
