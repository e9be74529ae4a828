"""Connecting to Ray with errors that say what to check: the address, and the token a cluster with
token authentication (Ray's default since 2.52) asks every process for."""

from __future__ import annotations

import os
import socket
from typing import Any

from capfilt.errors import CapfiltError

TOKEN_HINT = (
    "on a cluster with token authentication (Ray's default) set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
    "(or ~/.ray/auth_token) to the cluster's token; RAY_AUTH_MODE=disabled where it runs without"
)
PROBE_TIMEOUT_S = 10.0  # to reach a GCS before ray.init, which retries for minutes where none listens


def connect_ray(address: str | None, **kwargs: Any) -> Any:
    """`ray.init(address=address, **kwargs)`. A GCS address (HOST:PORT) where nothing answers, an
    address Ray cannot parse, and a cluster that refuses this process's token are CapfiltErrors
    naming the address and what to set: Ray itself retried for minutes where nothing listened, or
    ended in a ConnectionError naming neither the address nor the token."""
    import ray
    import ray.exceptions

    where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
    _probe(where)
    refused = getattr(ray.exceptions, "AuthenticationError", ())  # Ray >= 2.52
    try:
        return ray.init(address=address, **kwargs)
    except refused as err:
        raise CapfiltError(
            f"the Ray cluster at {where} refused this process's token ({err}): {TOKEN_HINT}"
        ) from err
    except ConnectionError as err:
        raise CapfiltError(
            f"could not connect to the Ray cluster at {where} ({err}): check the address (--ray-address or "
            f"RAY_ADDRESS) and that the cluster is up; {TOKEN_HINT}"
        ) from err
    except ValueError as err:  # "Invalid address format"
        raise CapfiltError(
            f"{where!r} is not a Ray cluster address ({err}): give HOST:PORT of its GCS (6379 by default), "
            "ray://HOST:10001, auto or local"
        ) from err


def _probe(where: str) -> None:
    """Refuse a HOST:PORT address where nothing accepts a connection within PROBE_TIMEOUT_S."""
    host, sep, port = where.rpartition(":")
    if not sep or "://" in where or not port.isdigit() or not host:
        return  # ray://..., auto, local, a new cluster: Ray's own checks
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise CapfiltError(
            f"could not connect to the Ray cluster at {where}: nothing answers there ({err}); check the "
            "address (--ray-address or RAY_ADDRESS, the head's GCS port, 6379 by default) and that the "
            "cluster is up"
        ) from err
