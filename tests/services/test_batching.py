"""Micro-batching: requests that arrive within the window share one forward pass, up to max_batch;
a failure fails its own requests only; over HTTP, concurrent requests share the actors' passes."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from capfilt.services.batching import MicroBatcher

from .conftest import Service


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.calls.append(list(items))
        time.sleep(0.01)  # a forward pass
        return [ValueError(f"odd {i}") if i == 13 else i * 10 for i in items]


def _run(batcher: MicroBatcher, items: list[int]) -> list[object]:
    async def go() -> list[object]:
        return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)

    return asyncio.run(go())


def test_requests_within_the_window_share_one_pass() -> None:
    run = Recorder()
    assert _run(MicroBatcher(run, max_batch=16, max_wait_s=0.05), list(range(10))) == [
        i * 10 for i in range(10)
    ]
    assert run.calls == [list(range(10))]


def test_batches_stop_at_max_batch_and_one_turns_batching_off() -> None:
    run = Recorder()
    _run(MicroBatcher(run, max_batch=4, max_wait_s=0.05), list(range(10)))
    assert [len(c) for c in run.calls] == [4, 4, 2] and [i for c in run.calls for i in c] == list(range(10))
    run = Recorder()
    _run(MicroBatcher(run, max_batch=1, max_wait_s=0.05), list(range(5)))
    assert run.calls == [[0], [1], [2], [3], [4]]


def test_a_lone_request_waits_at_most_the_window() -> None:
    run = Recorder()
    start = time.perf_counter()
    assert _run(MicroBatcher(run, max_batch=16, max_wait_s=0.05), [3]) == [30]
    assert time.perf_counter() - start < 0.5


def test_failures_stay_with_their_requests() -> None:
    results = _run(MicroBatcher(Recorder(), max_batch=16, max_wait_s=0.01), [12, 13, 14])
    assert results[0] == 120 and results[2] == 140
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 13"

    def broken(items: Sequence[int]) -> list[int]:
        if 0 in items:
            raise RuntimeError("forward pass failed")
        return list(items)

    async def go() -> tuple[object, object]:
        batcher = MicroBatcher(broken, max_batch=4, max_wait_s=0.0)
        first = await asyncio.gather(batcher.submit(0), return_exceptions=True)
        return first[0], await batcher.submit(5)  # the worker survived

    failed, later = asyncio.run(go())
    assert isinstance(failed, RuntimeError) and later == 5
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(broken, max_batch=0, max_wait_s=0.0)


def _batch_histogram(metrics: str, model: str) -> tuple[float, float]:
    """(forward passes, requests) of a model from capfilt_batch_size."""
    count = re.search(rf'capfilt_batch_size_count{{model="{model}"}} ([0-9.e+]+)', metrics)
    total = re.search(rf'capfilt_batch_size_sum{{model="{model}"}} ([0-9.e+]+)', metrics)
    assert count and total, metrics
    return float(count.group(1)), float(total.group(1))


def test_concurrent_http_requests_share_forward_passes(service: Service, image_files) -> None:
    body = {"image": base64.b64encode(image_files[1].read_bytes()).decode(), "num_captions": 2}
    n = 12
    # Clients are made before the burst and a barrier releases all n requests together: on a
    # loaded 2-core machine, making a client (its TLS context) took longer than a forward pass,
    # and the requests then arrived one by one. Up to three bursts: one that shares a pass is
    # enough, and none ever does when requests are not batched.
    clients = [service.client(key=None) for _ in range(n)]
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        barrier.wait(timeout=60)
        return clients[i].post("/v1/caption", json={**body, "seed": i})

    try:
        with service.client(key=None) as client, ThreadPoolExecutor(max_workers=n) as pool:
            for _ in range(3):
                passes0, requests0 = _batch_histogram(client.get("/metrics").text, "captioner")
                answers = list(pool.map(one, range(n)))
                passes1, requests1 = _batch_histogram(client.get("/metrics").text, "captioner")
                assert all(a.status_code == 200 for a in answers)
                assert requests1 - requests0 == n
                if passes1 - passes0 < n:
                    break
    finally:
        for c in clients:
            c.close()
    assert passes1 - passes0 < n, f"no two of {n} concurrent requests shared a forward pass, in 3 bursts"
    # a caption depends on its seed, not on its batch: the same request alone gives the same captions
    with service.client(key=None) as client:
        alone = client.post("/v1/caption", json={**body, "seed": 5}).json()["captions"]
    assert alone == answers[5].json()["captions"]


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_filter_actor_holds_one_model_for_cleaned_and_raw_texts(our_filter_dir, precision: str) -> None:
    """The actor scores texts cleaned (BLIP's pre_caption) or raw with one set of weights: in fast
    mode each Filter made its own converted copy of the model, twice the memory on a GPU."""
    from capfilt.services.actors import ModelHost

    host = ModelHost("filter", str(our_filter_dir), "cpu", 1, 4, 0.01, precision=precision)
    cleaned, raw = host.filters[True], host.filters[False]
    assert cleaned.med is raw.med and (cleaned.clean_text, raw.clean_text) == (True, False)
    assert cleaned.precision == raw.precision == precision
