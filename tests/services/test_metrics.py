"""/healthz, /readyz and /metrics: Prometheus text with request counts and latencies by route
template, batch sizes, readiness and jobs by state."""

from __future__ import annotations

from .conftest import Service


def test_probes_and_metrics(service: Service) -> None:
    with service.client(key=None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        client.get("/v1/jobs/some-id")  # 401: counted under the route template, not the raw path
        metrics = client.get("/metrics")
    assert ready["ready"] is True and ready["captioner_id"].startswith("sha256:")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'capfilt_http_requests_total{method="GET",route="/readyz",status="200"}' in text
    assert 'capfilt_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="401"}' in text
    assert "some-id" not in text
    assert 'capfilt_http_request_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text
    assert "capfilt_models_ready 1.0" in text
    assert 'capfilt_batch_size_bucket{le="1",model="filter"}' in text
    assert 'capfilt_forward_seconds_total{model="captioner"}' in text
    for state in ("PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"):
        assert f'capfilt_jobs{{state="{state}"}}' in text
    assert "capfilt_jobs_up 1.0" in text  # Ray Jobs answered this scrape
