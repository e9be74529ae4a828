"""Prometheus metrics of the service (`GET /metrics`), in a registry of the app's own.

- capfilt_http_requests_total{route, method, status} and capfilt_http_request_seconds{route, method}:
  every request, labelled by its route template (`/v1/jobs/{job_id}`, never the raw path, so a
  client cannot grow the label set; unmatched paths count as "unmatched", methods outside the
  standard seven as "other")
- capfilt_batch_size{model}: requests per forward pass, and capfilt_forward_seconds_total{model},
  read from the model actors when scraped
- capfilt_models_ready: 1 once every actor has loaded its model
- capfilt_model_requests_in_flight{model}: requests this service has sent to a model's replicas and
  not yet had answered (queued or in a forward pass); each replica holds at most `--max-queue`
- capfilt_jobs{state}: the cleaning jobs by Ray Jobs state, and capfilt_jobs_up: 1 when Ray Jobs
  answered this scrape, 0 when it did not. Then capfilt_jobs has no series at all, rather than
  zeros a `capfilt_jobs{state="FAILED"} > 0` alert would read as "no failures"; alert on
  `capfilt_jobs_up == 0` instead (as on a target's `up`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
JOB_STATES = ("PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")


class HttpMetrics:
    """Request counts and latencies."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "capfilt_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "capfilt_http_request_seconds",
            "HTTP request latency by route and method",
            ["route", "method"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )


# The methods a request is counted under; any other (a client can send any token) is "other", so
# that no client grows the label set.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class MetricsMiddleware:
    """Pure ASGI middleware: times each HTTP request and counts it by route template and status.
    `routes` (the app's): a request answered before routing (a 413 on its declared length) or by
    a route that does not record itself (/docs) is still counted under the route it asked for."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, routes: list[Any] | None = None) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes if routes is not None else []

    def _route(self, scope: Scope) -> str:
        from starlette.routing import Match

        path = getattr(scope.get("route"), "path", None)
        if path:
            return path
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", None) or "unmatched"
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self._route(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)


class ServiceCollector(Collector):
    """Read at scrape time: batch sizes from the model actors, readiness, jobs by state."""

    def __init__(self, models: Any, jobs: Any) -> None:
        self.models, self.jobs = models, jobs  # ModelPool | None, JobManager | None

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "capfilt_models_ready", "1 once every model actor has loaded its checkpoint"
        )
        try:
            ready.add_metric([], 1.0 if self.models is not None and self.models.ready() else 0.0)
        except Exception:  # a failed actor: not ready
            ready.add_metric([], 0.0)
        yield ready
        in_flight = GaugeMetricFamily(
            "capfilt_model_requests_in_flight",
            "requests sent to a model's replicas and not yet answered (queued or in a forward pass)",
            labels=["model"],
        )
        for role, counts in sorted(getattr(self.models, "in_flight", {}).items()):
            in_flight.add_metric([role], sum(counts))
        yield in_flight
        batch = HistogramMetricFamily(
            "capfilt_batch_size", "requests per forward pass of a model actor", labels=["model"]
        )
        seconds = CounterMetricFamily(
            "capfilt_forward_seconds", "time the model actors spent in forward passes", labels=["model"]
        )
        stats = self.models.stats() if self.models is not None and self.models.info else {}
        for role, s in sorted(stats.items()):
            buckets = [(str(b), sum(n for size, n in s.sizes.items() if size <= b)) for b in BATCH_BUCKETS]
            buckets.append(("+Inf", sum(s.sizes.values())))
            batch.add_metric([role], buckets, sum_value=sum(size * n for size, n in s.sizes.items()))
            seconds.add_metric([role], s.seconds)
        yield batch
        yield seconds
        jobs = GaugeMetricFamily(
            "capfilt_jobs", "this service's cleaning jobs by Ray Jobs state", labels=["state"]
        )
        up = GaugeMetricFamily(
            "capfilt_jobs_up", "1 when Ray Jobs listed the jobs for this scrape, 0 when it could not"
        )
        # no JobManager: the cluster has no dashboard, so Ray Jobs cannot be reached either
        counts = self.jobs.counts_by_state() if self.jobs is not None else None
        up.add_metric([], 0.0 if counts is None else 1.0)
        if counts is not None:  # not known: no series, rather than zeros
            for state in sorted(set(JOB_STATES) | set(counts)):
                jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield up
