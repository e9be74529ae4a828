"""The routes' dependencies, as `Annotated` aliases: the config, the models, the jobs, the API key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .actors import ModelPool, ModelUnavailable
from .config import ServeConfig
from .errors import ServiceUnavailable
from .jobs import JobManager, require_jobs_enabled


def get_config(request: Request) -> ServeConfig:
    return request.app.state.config


def get_models(request: Request) -> ModelPool:
    models: ModelPool | None = request.app.state.models
    if models is None or not models.ready():
        down = models.restarting() if models is not None and models.info else []
        if down:
            raise ModelUnavailable(
                f"the {' and '.join(down)} model stopped (killed or out of memory) and is being restarted; "
                "GET /readyz answers 200 once it is back"
            )
        raise ModelUnavailable("the models are still loading; GET /readyz answers 200 once they are ready")
    return models


def get_jobs(request: Request) -> JobManager:
    jobs: JobManager | None = request.app.state.jobs
    if jobs is None:  # `capfilt serve` found no Ray dashboard, so no Ray Jobs to submit to
        require_jobs_enabled(request.app.state.config)
        raise ServiceUnavailable(
            "the Ray cluster this service runs on has no dashboard, so it cannot reach Ray Jobs: "
            "start Ray with its dashboard (ray[default]; `ray start --head --include-dashboard=true`)"
        )
    return jobs


ConfigDep = Annotated[ServeConfig, Depends(get_config)]
ModelsDep = Annotated[ModelPool, Depends(get_models)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]

_bearer = HTTPBearer(
    auto_error=False,
    description="the service's API key (CAPFILT_API_KEY or --api-key-file of `capfilt serve`)",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def require_key(config: ConfigDep, credentials: Credentials) -> None:
    """401 unless the request carries the API key (when the service has one)."""
    if config.api_key is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(401, "missing API key: send the header 'Authorization: Bearer <key>'", challenge)
    # constant time: how much of a guess matches must not show in the response time
    if not hmac.compare_digest(credentials.credentials.encode(), config.api_key.encode()):
        raise HTTPException(401, "wrong API key", challenge)


def require_key_if_all(config: ConfigDep, credentials: Credentials) -> None:
    """`require_key` when the service guards every endpoint (`--auth all`)."""
    if config.auth == "all":
        require_key(config, credentials)
