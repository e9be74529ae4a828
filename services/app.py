"""The FastAPI app: only assembles config, models, jobs, metrics, error handlers and routers."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.routing import Route

from . import limits
from .actors import ModelPool
from .config import ServeConfig
from .disconnect import CancelOnDisconnect
from .errors import install_error_handlers
from .jobs import JobManager
from .limits import BodyLimitMiddleware
from .metrics import HttpMetrics, MetricsMiddleware, ServiceCollector
from .routes_health import router as health_router
from .routes_inference import router as inference_router
from .routes_jobs import router as jobs_router

DESCRIPTION = """BLIP's Captioning and Filtering as a service: caption and score single image-text pairs
with the cleaning job's models and decision rule, and submit and watch `capfilt clean` jobs on Ray.

Images go as base64 in a JSON body or as the file part `image` of a multipart/form-data body."""


def create_app(config: ServeConfig, models: ModelPool | None, jobs: JobManager | None) -> FastAPI:
    """The service's app. `models` None: the inference endpoints answer 503 (tests of the HTTP layer)."""
    # No trailing-slash redirects: Starlette builds their Location from the client's Host header.
    app = FastAPI(title="CapFilt", version="0.1.0", description=DESCRIPTION, redirect_slashes=False)
    app.state.config, app.state.models, app.state.jobs = config, models, jobs
    registry = CollectorRegistry()
    registry.register(ServiceCollector(models, jobs))
    app.state.registry = registry
    install_error_handlers(app)
    routers = (health_router, inference_router, jobs_router)
    for router in routers:
        app.include_router(router)
    # a client gone before its caption or score: the work is cancelled (the job routes run to the end)
    app.add_middleware(CancelOnDisconnect, paths=frozenset(r.path for r in inference_router.routes))
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=config.max_body_bytes,
        idle_s=limits.BODY_IDLE_S,
        total_s=limits.BODY_TOTAL_S,
    )
    # outermost: sees every answer; the routes (the docs' and ours) name the requests it counts
    routes = [r for r in app.router.routes if isinstance(r, Route)] + [r for x in routers for r in x.routes]
    app.add_middleware(MetricsMiddleware, metrics=HttpMetrics(registry), routes=routes)
    return app
