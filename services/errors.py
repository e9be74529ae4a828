"""Every error a client can cause is a 4xx whose message says what was wrong; never a 5xx.

- a body that fails its schema: 422, FastAPI's shape (`detail`: a list of {loc, msg, type})
- everything else: `{"detail": "...", "reason": ...}` (`schemas.ErrorBody`); a request the schema
  admits but the service cannot do (settings the model refuses, a relative path): 400
- images: 400 when empty or undecodable, 413 when over the pixel limit (reason: the ImageError code)
- the body over `--max-body-bytes`: 413 naming the limit; a body that stalls or trickles: 408
- a model replica down or still loading, Ray Jobs unreachable: 503; a client that hung up before
  its body arrived: 499 (logged in a line, not counted as a server error); anything else is a bug:
  500, logged with its traceback
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from capfilt.errors import CapfiltError
from capfilt.images import ImageError

log = logging.getLogger(__name__)


class ClientError(CapfiltError):
    """A request the service refuses for a reason its body's schema cannot express (a path outside
    the roots, a job that does not exist...); `status` is the 4xx to answer with."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        assert 400 <= status < 500
        super().__init__(message)
        self.status, self.reason = status, reason


class ServiceUnavailable(RuntimeError):
    """Something the service depends on (Ray Jobs, a model replica) cannot answer now: a 503, with
    `reason` in its body and Retry-After `retry_after_s`."""

    reason = "unavailable"
    retry_after_s = 5


def _error(
    status: int, detail: str, reason: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "reason": reason}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.url.path} (see /docs)"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path} (see /docs)"
        # a reason where the exception carries one (limits.BodyTooLarge)
        reason = getattr(exc, "reason", None)
        return _error(exc.status_code, detail, reason, headers=getattr(exc, "headers", None))

    @app.exception_handler(ImageError)
    async def bad_image(request: Request, exc: ImageError) -> JSONResponse:
        return _error(413 if exc.reason == "image_too_large" else 400, str(exc), exc.reason)

    @app.exception_handler(ClientError)
    async def refused_request(request: Request, exc: ClientError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.reason)

    @app.exception_handler(CapfiltError)
    async def refused(request: Request, exc: CapfiltError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(ServiceUnavailable)
    async def unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return _error(503, str(exc), exc.reason, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up before its body arrived: nobody reads this answer, and it is no
        # server error (nginx's 499 "client closed request"), so neither a 5xx nor a traceback.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return _error(499, "the client closed the request before its body arrived", "client_closed_request")

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server log has the details", "internal_error")
