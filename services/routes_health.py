"""GET /healthz (the process answers), /readyz (the models are loaded), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .actors import CAPTIONER, FILTER, ModelPool, ModelUnavailable
from .deps import require_key_if_all
from .schemas import ErrorBody, Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """200 while the process serves HTTP."""
    return Health()


@router.get("/readyz", responses={503: {"model": Ready, "description": "the models are still loading"}})
async def readyz(request: Request) -> Ready:
    """200 once every model actor has loaded its checkpoint, else 503."""
    models: ModelPool | None = request.app.state.models
    try:
        ready = models is not None and models.ready()
    except ModelUnavailable:
        ready = False
    if not ready:
        return JSONResponse(Ready(ready=False).model_dump(), status_code=503)  # type: ignore[return-value]
    assert models is not None
    return Ready(ready=True, captioner_id=models.info[CAPTIONER].digest, filter_id=models.info[FILTER].digest)


@router.get(
    "/metrics",
    dependencies=[Depends(require_key_if_all)],
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        401: {"model": ErrorBody, "description": "missing or wrong API key (with --auth all)"},
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests, latencies, batch sizes, readiness, jobs by state."""
    data = await run_in_threadpool(generate_latest, request.app.state.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
