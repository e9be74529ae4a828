"""A bounded loopback load test of the running `capfilt serve` (the session's: tiny models, two
replicas per model, micro-batching): 8 clients post back to back for 5 s, with `capfilt bench
serve`'s load generator; every request must be answered 200. Run with -s for the figures."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from capfilt.services.bench import _load, request_body

from .conftest import Service

CLIENTS = 8
WARMUP_S = 1.0
DURATION_S = 5.0


def test_eight_clients_for_five_seconds_get_no_errors(service: Service) -> None:
    bodies = [json.dumps(request_body("score", 64, i)).encode() for i in range(32)]  # 3 texts each
    latencies, status = asyncio.run(_load(service.url, "/v1/score", bodies, CLIENTS, WARMUP_S, DURATION_S))
    answered = sum(status.values())
    ms = np.array(latencies) * 1000
    p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99))
    print(
        f"\nload /v1/score: {CLIENTS} clients, {DURATION_S:.0f} s: {answered} requests, "
        f"{answered / DURATION_S:.1f} req/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms, statuses {status}"
    )
    assert answered > CLIENTS, "too few requests to call it load"
    assert status == {200: answered}, status
    assert 0 < p50 <= p99 < 10_000  # a request held up for 10 s on loopback is an error in all but name
