"""Clients that give up are not served anyway: the running `capfilt serve` (the session's: tiny
models, two replicas each) cancels the queued work of requests whose clients hung up, so the model
actors spend their forward passes on the clients still waiting (before, 200 abandoned caption
requests all ran, and the next client waited behind them)."""

from __future__ import annotations

import json
import socket
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from capfilt.services.bench import request_body

from .conftest import Service

ABANDONED = 96
# a heavy caption request: 16 sampled captions, every one of 40 tokens
HEAVY = {"num_captions": 16, "max_tokens": 40, "min_tokens": 40}


def _metrics(service: Service) -> tuple[float, float, float]:
    """So far: caption requests run in forward passes, /v1/caption requests answered (any status),
    and those counted as 499 (the client hung up first)."""
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    run = answered = gone = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "capfilt_batch_size_sum" and labels.get("model") == "captioner":
                run += sample.value
            if sample.name == "capfilt_http_requests_total" and labels.get("route") == "/v1/caption":
                answered += sample.value
                gone += sample.value if labels.get("status") == "499" else 0.0
    return run, answered, gone


def _in_flight(service: Service) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "capfilt_model_requests_in_flight" and sample.labels["model"] == "captioner":
                return sample.value
    raise AssertionError("no capfilt_model_requests_in_flight for the captioner")


def _post(service: Service, bodies: list[bytes]) -> list[socket.socket]:
    """Post every body, each on its own connection."""
    url = httpx.URL(service.url)
    sockets = []
    for body in bodies:
        sock = socket.create_connection((url.host, url.port), timeout=60)
        head = (
            f"POST /v1/caption HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        sockets.append(sock)
    return sockets


def test_abandoned_requests_are_cancelled_not_run(service: Service) -> None:
    bodies = [json.dumps({**request_body("caption", 64, i), **HEAVY}).encode() for i in range(ABANDONED)]
    started = time.monotonic()  # every one answered: how long this machine takes over them
    for sock in _post(service, bodies):
        with sock:
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    served_s = time.monotonic() - started
    before = _metrics(service)
    sockets = _post(service, bodies)
    time.sleep(served_s / 5)  # then every client gives up without reading its answer
    for sock in sockets:
        sock.close()
    deadline = time.monotonic() + 60  # each request is counted once the service has let it go
    while _metrics(service)[1] - before[1] < ABANDONED and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a forward pass running when its clients left still finishes
    run, counted, gone = (now - then for now, then in zip(_metrics(service), before))
    print(
        f"\n{ABANDONED} served in {served_s:.2f} s; left after a fifth: {gone:.0f} counted as 499, {run:.0f} run"
    )
    assert counted == ABANDONED and _in_flight(service) == 0
    # what had not reached a forward pass when its client left was dropped, not run (all 96 ran
    # before); the passes under way when they left still run
    assert run <= ABANDONED * 3 // 4, f"{run:.0f} of {ABANDONED} requests ran"
    assert gone >= ABANDONED - run  # every one dropped is a 499
    with httpx.Client(base_url=service.url, timeout=30) as client:  # and the service still serves
        answer = client.post("/v1/caption", json=request_body("caption", 64, 0))
        assert answer.status_code == 200 and answer.json()["captions"]
