"""`capfilt serve` killed and started again while a cleaning job it submitted runs: the job lives in
Ray Jobs, not in the service, so it runs on, and the new service reports it and its end."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from capfilt.ledger import read_ledger

from .conftest import RayHead, free_port, serve

JOB_TIMEOUT_S = 240


def _state(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_a_job_survives_a_service_restart(
    ray_head: RayHead,
    input_root: Path,
    our_captioner_dir: Path,
    our_filter_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    start = time.monotonic()
    output_root = tmp_path_factory.mktemp("restart_outputs")
    log_path = tmp_path_factory.mktemp("restart_log") / "serve.log"
    models = (ray_head, input_root, output_root, our_captioner_dir, our_filter_dir, log_path)
    port = free_port()  # the same address before and after: what clients of a restarted service see
    out = output_root / "job"
    body = {"input": [str(input_root / "web" / "00000.tar")], "output": str(out), "batch_size": 8}
    with serve(*models, port=port, replicas=1, wait_ready=False) as (first, proc):
        with first.client() as client:
            submitted = client.post("/v1/jobs", json=body)
            assert submitted.status_code == 201, submitted.text
            job_id = submitted.json()["id"]
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while (state := _state(client, job_id)["state"]) == "PENDING":
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.2)
        assert state == "RUNNING", state
        os.killpg(proc.pid, signal.SIGKILL)  # no shutdown: as a crash or an OOM kill would
        proc.wait()
    killed_at = time.monotonic()
    with serve(*models, port=port, replicas=1, wait_ready=False) as (second, _), second.client() as client:
        assert second.url == first.url
        seen = [_state(client, job_id)]
        while seen[-1]["state"] in ("PENDING", "RUNNING"):
            assert time.monotonic() < killed_at + JOB_TIMEOUT_S, seen[-1]
            time.sleep(0.5)
            seen.append(_state(client, job_id))
        listed = [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
    info = seen[-1]
    print(
        f"\nservice killed {killed_at - start:.1f} s in, the job {seen[0]['state']} after the restart, "
        f"{info['state']} {time.monotonic() - start:.1f} s in"
    )
    assert info["state"] == "SUCCEEDED", info
    assert job_id in listed and info["output"] == str(out)
    assert info["progress"]["shards_done"] == 1 and info["progress"]["samples_done"] == 20
    assert read_ledger(out).num_rows == 20


def _model_host_pids() -> set[int]:
    import psutil

    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "ray::ModelHost" in " ".join(p.info["cmdline"] or []):
                pids.add(p.pid)
    return pids


def test_a_killed_model_actor_is_restarted_and_the_service_says_so(
    ray_head: RayHead,
    input_root: Path,
    our_captioner_dir: Path,
    our_filter_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    image_files,
) -> None:
    """SIGKILL to the model actors (as the OOM killer would): their requests answer a 503 that
    leaks no actor id, pid or address; /readyz is 503 while no replica is up; Ray restarts them,
    and the service serves again (before, it stayed "ready" and answered 503 for ever)."""
    import base64

    before = _model_host_pids()
    log_path = tmp_path_factory.mktemp("actor_death_log") / "serve.log"
    models = (
        ray_head,
        input_root,
        tmp_path_factory.mktemp("actor_death_out"),
        our_captioner_dir,
        our_filter_dir,
    )
    image = base64.b64encode(Path(image_files[0]).read_bytes()).decode()
    with serve(*models, log_path, replicas=1) as (service, _), service.client() as client:
        ours = _model_host_pids() - before
        assert len(ours) == 2, ours  # the captioner's and the filter's
        assert client.post("/v1/score", json={"image": image, "texts": ["a red square"]}).status_code == 200
        for pid in ours:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        failed = client.post("/v1/score", json={"image": image, "texts": ["a red square"]})
        assert failed.status_code == 503, failed.text
        assert failed.json()["reason"] == "unavailable" and "retry" in failed.json()["detail"]
        for leak in ("pid", "ip=", "actor_id", "namespace", "ActorDiedError"):
            assert leak not in failed.text
        assert client.get("/readyz").status_code == 503
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model actor was not restarted"
            time.sleep(0.5)
        again = client.post("/v1/score", json={"image": image, "texts": ["a red square"]})
        assert again.status_code == 200, again.text
        assert client.post("/v1/caption", json={"image": image}).status_code == 200
        assert not (_model_host_pids() - before) & ours  # new processes
