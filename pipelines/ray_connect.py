"""Connecting to Ray with errors that say what to check: the address, and the token a cluster with
token authentication (Ray's default since 2.52) asks every process for."""

from __future__ import annotations

import os
from typing import Any

from capfilt.errors import CapfiltError

TOKEN_HINT = (
    "on a cluster with token authentication (Ray's default) set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
    "(or ~/.ray/auth_token) to the cluster's token; RAY_AUTH_MODE=disabled where it runs without"
)


def connect_ray(address: str | None, **kwargs: Any) -> Any:
    """`ray.init(address=address, **kwargs)`; a cluster that cannot be reached or refuses this
    process's token is a CapfiltError naming the address and what to set (Ray's own error is a
    ConnectionError after 20 s of retries, naming neither)."""
    import ray
    from ray.exceptions import AuthenticationError

    where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
    try:
        return ray.init(address=address, **kwargs)
    except AuthenticationError as err:
        raise CapfiltError(
            f"the Ray cluster at {where} refused this process's token ({err}): {TOKEN_HINT}"
        ) from err
    except ConnectionError as err:
        raise CapfiltError(
            f"could not connect to the Ray cluster at {where} ({err}): check the address (--ray-address or "
            f"RAY_ADDRESS) and that the cluster is up; {TOKEN_HINT}"
        ) from err
