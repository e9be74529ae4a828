"""The service answers what the command line answers: /v1/score is `capfilt score`, /v1/caption is
`capfilt caption`, /v1/capfilt is the cleaning job's ledger row for the same key and seed, and a
job submitted over REST is a Ray job (Ray's own client lists it) whose output equals the CLI run's.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from capfilt.ledger import read_ledger

from .conftest import Service
from .conftest import ray_jobs as ray_jobs_client

SEED = 7
THRESHOLD = 0.0222  # the tiny random filter's p(match) lie in 0.020-0.023: keep about half
JOB_OPTIONS = {"num_captions": 2, "seed": SEED, "threshold": THRESHOLD, "batch_size": 8}
JOB_TIMEOUT_S = 300


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    from capfilt.cli import main

    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_score_equals_capfilt_score(service: Service, image_files: list[Path], capsys) -> None:
    texts = ["a red circle on a blue background", "logo.png", "Two DOGS running!"]
    for image in image_files[:2]:
        argv = ["score", "--model", str(service.filter), "--image", str(image), "--json"]
        cli = _cli_json(argv + [x for t in texts for x in ("--text", t)], capsys)["scores"]
        with service.client(key=None) as client:
            upload = client.post(
                "/v1/score", files={"image": (image.name, image.read_bytes())}, data={"texts": texts}
            )
            as_json = client.post(
                "/v1/score", json={"image": base64.b64encode(image.read_bytes()).decode(), "texts": texts}
            )
        for response in (upload, as_json):
            assert response.status_code == 200, response.text
            rest = response.json()["scores"]
            assert [r["text"] for r in rest] == [c["text"] for c in cli] == texts
            for r, c in zip(rest, cli):
                assert math.isclose(r["itm"], c["itm"], abs_tol=1e-6) and math.isclose(
                    r["itc"], c["itc"], abs_tol=1e-6
                )
        assert upload.json()["filter_id"].startswith("sha256:")


def test_caption_equals_capfilt_caption(service: Service, image_files: list[Path], capsys) -> None:
    image = image_files[0]
    for options in (["--num-captions", "3", "--seed", "11"], ["--method", "beam", "--num-captions", "2"]):
        argv = ["caption", "--model", str(service.captioner), str(image), "--json", *options]
        cli = _cli_json(argv, capsys)["results"][0]["captions"]
        form = {"num_captions": options[options.index("--num-captions") + 1]}
        if "--seed" in options:
            form["seed"] = "11"
        if "--method" in options:
            form["method"] = "beam"
        with service.client(key=None) as client:
            response = client.post(
                "/v1/caption", files={"image": (image.name, image.read_bytes())}, data=form
            )
        assert response.status_code == 200, response.text
        assert response.json()["captions"] == cli and len(cli) == int(form["num_captions"])


@pytest.fixture(scope="module")
def runs(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same job twice on the service's Ray: submitted over REST, and run by `capfilt clean`."""
    shard = str(service.input_root / "web" / "00000.tar")
    rest_out = service.output_root / "rest_job"
    with service.client() as client:
        submitted = client.post("/v1/jobs", json={"input": [shard], "output": str(rest_out), **JOB_OPTIONS})
    assert submitted.status_code == 201, submitted.text
    job = submitted.json()
    cli_out = tmp_path_factory.mktemp("cli_job") / "out"
    argv = [sys.executable, "-m", "capfilt.cli", "clean", "--input", shard, "--output", str(cli_out)]
    argv += [
        "--captioner",
        str(service.captioner),
        "--filter",
        str(service.filter),
        "--ray-address",
        service.ray_address,
    ]
    argv += ["--num-captions", "2", "--seed", str(SEED), "--threshold", str(THRESHOLD), "--batch-size", "8"]
    states = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    with service.client() as client:
        while True:
            info = client.get(f"/v1/jobs/{job['id']}").json()
            states.append(info["state"])
            if info["state"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    # Then the CLI run. Not both at once: two clean jobs' actor pools can take every CPU of a
    # 2-CPU Ray between them and leave neither room for its read tasks.
    # Ray 2.60: a driver given an explicit address uses the cluster's token auth only when told to
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cli = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=JOB_TIMEOUT_S)
    assert cli.returncode == 0, cli.stderr[-3000:]
    return {
        "job": job,
        "info": info,
        "states": states,
        "rest_out": rest_out,
        "cli_out": cli_out,
        "shard": shard,
    }


def test_job_over_rest_is_a_ray_job_that_runs_to_completion(service: Service, runs: dict[str, Any]) -> None:
    from ray.job_submission import JobStatus

    job, info = runs["job"], runs["info"]
    assert job["id"].startswith("capfilt_clean_") and job["state"] in ("PENDING", "RUNNING")
    assert job["dashboard"] == f"{service.dashboard}/#/jobs/{job['id']}"
    ray_jobs = ray_jobs_client(service.dashboard)
    assert job["id"] in {j.submission_id for j in ray_jobs.list_jobs()}
    assert ray_jobs.get_job_status(job["id"]) == JobStatus.SUCCEEDED, ray_jobs.get_job_logs(job["id"])[-3000:]
    entrypoint = ray_jobs.get_job_info(job["id"]).entrypoint
    assert " -m capfilt.cli clean --input " in entrypoint and "--threshold 0.0222" in entrypoint
    assert info["state"] == "SUCCEEDED" and "RUNNING" in runs["states"], info
    assert info["progress"]["shards_total"] == info["progress"]["shards_done"] == 1
    assert info["progress"]["samples_done"] == 20 and sum(info["progress"]["reasons"].values()) == 20
    summary = info["summary"]  # what the CLI printed at the end, from OUT/summary.json
    assert (
        summary["samples"] == 20
        and summary["threshold"] == 0.0222
        and summary["report"].endswith("report.html")
    )
    with service.client() as client:
        listed = client.get("/v1/jobs").json()["jobs"]
        logs = client.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 5}).json()["logs"]
        stop = client.delete(f"/v1/jobs/{job['id']}")
    assert job["id"] in [j["id"] for j in listed]
    assert logs.count("\n") <= 5 and '"samples": 20' in logs  # the CLI's JSON summary ends the log
    assert stop.status_code == 409 and "already ended: SUCCEEDED" in stop.json()["detail"]


def _close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-6))


def _same_row(a: dict[str, Any], b: dict[str, Any]) -> None:
    exact = ("key", "status", "reason", "web_text", "web_kept", "synthetic_kept", "threshold", "seed")
    assert {k: a[k] for k in exact} == {k: b[k] for k in exact}
    assert (a["captioner_id"], a["filter_id"]) == (b["captioner_id"], b["filter_id"])
    assert _close(a["web_itm"], b["web_itm"]) and _close(a["web_itc"], b["web_itc"])
    assert [c["text"] for c in a["synthetic"]] == [c["text"] for c in b["synthetic"]]
    for x, y in zip(a["synthetic"], b["synthetic"]):
        assert _close(x["itm"], y["itm"]) and _close(x["itc"], y["itc"])


def test_job_output_equals_the_cli_runs(runs: dict[str, Any]) -> None:
    rest = sorted(read_ledger(runs["rest_out"]).to_pylist(), key=lambda r: r["key"])
    cli = sorted(read_ledger(runs["cli_out"]).to_pylist(), key=lambda r: r["key"])
    assert len(rest) == len(cli) == 20
    for a, b in zip(rest, cli):
        _same_row(a, b)
        assert a["shard"] == b["shard"] == runs["shard"]
    kept = sum(bool(r["web_kept"]) + len(r["synthetic_kept"]) for r in cli)
    assert 0 < kept < 60, "the threshold should keep some texts and drop others"
    for name in ("dprime", "dprime_index"):
        assert sorted(p.name for p in (runs["rest_out"] / name).iterdir()) == sorted(
            p.name for p in (runs["cli_out"] / name).iterdir()
        )
    assert (runs["rest_out"] / "dprime" / "00000.tar").read_bytes() == (
        runs["cli_out"] / "dprime" / "00000.tar"
    ).read_bytes()


def test_capfilt_equals_the_jobs_ledger_row(service: Service, runs: dict[str, Any]) -> None:
    from capfilt.pipelines.clean_inputs import read_input

    ledger = {r["key"]: r for r in read_ledger(runs["cli_out"]).to_pylist()}
    samples = {s.key: s for s in read_input(runs["shard"])[0]}
    kept_web = [k for k, r in ledger.items() if r["web_kept"]][:2]
    dropped_web = [k for k, r in ledger.items() if r["web_itm"] is not None and not r["web_kept"]][:2]
    assert kept_web and dropped_web
    with service.client(key=None) as client:
        for key in kept_web + dropped_web:
            sample = samples[key]
            assert sample.image is not None
            body = {
                "image": base64.b64encode(sample.image).decode(),
                "text": sample.text,
                "key": key,
                "seed": SEED,
                "threshold": THRESHOLD,
                "num_captions": 2,
            }
            response = client.post("/v1/capfilt", json=body)
            assert response.status_code == 200, response.text
            got = response.json()
            _same_row(got, ledger[key])
            kept = [(k["origin"], k["text"]) for k in got["kept"]]
            assert kept == [("web", got["web_text"])] * got["web_kept"] + [
                ("synthetic", t) for t in got["synthetic_kept"]
            ]
