"""Submitting jobs without a Ray cluster: the service's app and JobManager in front of a fake of
Ray's JobSubmissionClient. One unfinished job per output tree (also for two submissions at once),
bodies refused as the inference routes refuse them, checkpoints checked as `capfilt clean` checks
them, progress read only under the output roots, and /metrics when Ray Jobs cannot answer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from capfilt.services.app import create_app
from capfilt.services.config import ServeConfig
from capfilt.services.errors import ClientError
from capfilt.services.jobs import JobManager
from capfilt.services.schemas import JobRequest

WEIGHTS = Path(__file__).resolve().parents[2] / "capfilt" / "weights" / "small"


class FakeRayJobs:
    """What JobManager asks of ray.job_submission.JobSubmissionClient, in memory.

    `listed_after_s`: how long a new job stays out of `list_jobs` (Ray's answer lagging a
    submission); `submit_s`: how long `submit_job` takes; `down`: every call fails as when the
    dashboard cannot be reached."""

    def __init__(self, listed_after_s: float = 0.0, submit_s: float = 0.0) -> None:
        self.jobs: dict[str, SimpleNamespace] = {}
        self.submitted_at: dict[str, float] = {}
        self.listed_after_s, self.submit_s = listed_after_s, submit_s
        self.down = False

    def _up(self) -> None:
        if self.down:
            raise ConnectionError("connection refused")

    def add(self, job_id: str, state: str, metadata: dict[str, str]) -> None:
        self.jobs[job_id] = SimpleNamespace(
            submission_id=job_id,
            job_id=None,
            status=state,
            metadata=metadata,
            start_time=int(time.time() * 1000),
            end_time=None,
            message=None,
            entrypoint="capfilt clean ...",
        )

    def submit_job(self, *, entrypoint: str, submission_id: str, metadata: dict, runtime_env: dict) -> str:
        self._up()
        time.sleep(self.submit_s)
        self.add(submission_id, "PENDING", metadata)
        self.submitted_at[submission_id] = time.monotonic()
        return submission_id

    def list_jobs(self) -> list[SimpleNamespace]:
        self._up()
        now = time.monotonic()
        return [
            j
            for i, j in list(self.jobs.items())
            if now - self.submitted_at.get(i, -1e9) >= self.listed_after_s
        ]

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        self._up()
        if job_id not in self.jobs:
            raise RuntimeError(f"Job {job_id} does not exist")
        return self.jobs[job_id]

    def stop_job(self, job_id: str) -> bool:
        self._up()
        return True  # as Ray: the job reads RUNNING until its driver has stopped


def _config(tmp_path: Path) -> ServeConfig:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(b"")
    (tmp_path / "out").mkdir()
    return ServeConfig(
        captioner=str(WEIGHTS / "captioner"),
        filter=str(WEIGHTS / "filter"),
        input_roots=(tmp_path / "in", WEIGHTS),
        output_roots=(tmp_path / "out",),
    )


def _manager(tmp_path: Path, ray: FakeRayJobs) -> JobManager:
    jobs = JobManager(_config(tmp_path), "http://127.0.0.1:9")
    jobs._client = ray
    return jobs


def _request(tmp_path: Path, output: str, **options: Any) -> JobRequest:
    return JobRequest(input=[str(tmp_path / "in")], output=str(tmp_path / "out" / output), **options)


@pytest.mark.parametrize("resume", [False, True])
def test_the_same_output_twice_is_a_conflict(tmp_path: Path, resume: bool) -> None:
    jobs = _manager(tmp_path, FakeRayJobs())
    first = jobs.submit(_request(tmp_path, "run", resume=resume))
    with pytest.raises(ClientError) as refused:
        jobs.submit(_request(tmp_path, "run", resume=resume))
    assert (refused.value.status, refused.value.reason) == (409, "output_in_use")
    assert f"is the output of job {first.id} (PENDING" in str(refused.value)


@pytest.mark.parametrize("resume", [False, True])
def test_a_running_job_s_output_with_files_is_in_use_not_merely_not_empty(
    tmp_path: Path, resume: bool
) -> None:
    """The running job has written into its output: a second submission names that job, resume or
    not (without resume it was `output_not_empty`, naming no job and suggesting resume)."""
    jobs = _manager(tmp_path, FakeRayJobs())
    first = jobs.submit(_request(tmp_path, "run"))
    (tmp_path / "out" / "run").mkdir()
    (tmp_path / "out" / "run" / "job.json").write_text("{}")
    for output in ("run", ""):  # the output itself, and the root that contains it
        with pytest.raises(ClientError) as refused:
            jobs.submit(_request(tmp_path, output, resume=resume))
        assert (refused.value.status, refused.value.reason) == (409, "output_in_use")
        assert f"output of job {first.id}" in str(refused.value)


def test_a_resume_into_a_directory_that_is_no_job_s_output_is_refused_at_once(tmp_path: Path) -> None:
    """`capfilt clean --resume` refuses it before any work; the service accepted it and the job failed."""
    jobs = _manager(tmp_path, FakeRayJobs())
    (tmp_path / "out" / "photos").mkdir()
    (tmp_path / "out" / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ClientError) as refused:
        jobs.submit(_request(tmp_path, "photos", resume=True))
    assert (refused.value.status, refused.value.reason) == (409, "output_not_a_job")
    assert "holds files but no job.json" in str(refused.value)
    assert not jobs.client.jobs


@pytest.mark.parametrize(
    ("first", "second", "how"),
    [
        ("run", "run/part", "is inside"),
        ("run/part", "run", "contains"),
        ("run", "", "contains"),  # the output root itself
        ("run", "run/../run", "is"),
    ],
)
def test_nested_outputs_conflict(tmp_path: Path, first: str, second: str, how: str) -> None:
    jobs = _manager(tmp_path, FakeRayJobs())
    job = jobs.submit(_request(tmp_path, first))
    with pytest.raises(ClientError, match=f"{how} the output of job {job.id}") as refused:
        jobs.submit(_request(tmp_path, second))
    assert refused.value.status == 409


def test_a_finished_job_frees_its_output_and_siblings_are_free(tmp_path: Path) -> None:
    ray = FakeRayJobs()
    jobs = _manager(tmp_path, ray)
    first = jobs.submit(_request(tmp_path, "run"))
    assert jobs.submit(_request(tmp_path, "run2")).state == "PENDING"  # a sibling, not nested
    ray.jobs[first.id].status = "STOPPED"
    assert jobs.submit(_request(tmp_path, "run", resume=True)).state == "PENDING"


def test_a_job_submitted_with_capfilt_metadata_outside_the_service_holds_its_output(tmp_path: Path) -> None:
    """operations.md section 5: `ray job submit --metadata-json '{"capfilt": "clean", "output": ...}'`."""
    ray = FakeRayJobs()
    ray.add("by-hand", "RUNNING", {"capfilt": "clean", "output": str(tmp_path / "out" / "run")})
    ray.add("other", "RUNNING", {"output": str(tmp_path / "out" / "x")})  # not a cleaning job
    jobs = _manager(tmp_path, ray)
    with pytest.raises(ClientError, match="inside the output of job by-hand"):
        jobs.submit(_request(tmp_path, "run/part"))
    assert jobs.submit(_request(tmp_path, "x")).state == "PENDING"


def test_two_submissions_at_once_get_one_job(tmp_path: Path) -> None:
    """Both pass the "output is empty" check before either job writes: only the lock around the
    check and the submission, and the service's memory of what Ray Jobs does not list yet, keep
    the second out."""
    ray = FakeRayJobs(listed_after_s=5.0, submit_s=0.2)
    jobs = _manager(tmp_path, ray)
    start = threading.Barrier(2)

    def submit(_: int) -> int:
        start.wait()
        try:
            jobs.submit(_request(tmp_path, "run"))
        except ClientError as err:
            return err.status
        return 201

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(submit, range(2))) == [201, 409]
    assert len(ray.jobs) == 1


def test_a_checkpoint_folder_or_role_that_clean_refuses_is_a_400(tmp_path: Path) -> None:
    jobs = _manager(tmp_path, FakeRayJobs())
    (tmp_path / "in" / "data").mkdir()
    cases = {
        "captioner": (str(tmp_path / "in" / "data"), "--captioner", "without config.json"),
        "filter": (str(WEIGHTS / "captioner"), "--filter", "is a captioner"),
    }
    for field, (path, flag, words) in cases.items():
        with pytest.raises(ClientError) as refused:
            jobs.submit(_request(tmp_path, "run", **{field: path}))
        assert refused.value.status == 400 and refused.value.reason == "invalid_checkpoint"
        assert f"{flag} {path}" in str(refused.value) and words in str(refused.value)
    swapped = _request(tmp_path, "run", captioner=str(WEIGHTS / "filter"), filter=str(WEIGHTS / "captioner"))
    with pytest.raises(ClientError, match="cannot write captions; pass a captioner checkpoint"):
        jobs.submit(swapped)
    good = _request(tmp_path, "run", captioner=str(WEIGHTS / "captioner"), filter=str(WEIGHTS / "filter"))
    assert jobs.submit(good).state == "PENDING"


def test_progress_is_read_only_under_the_output_roots(tmp_path: Path) -> None:
    """A job listed by its metadata says where its output is; the service reads there only when
    that lies under an output root, as for the outputs it accepts itself."""
    ray = FakeRayJobs()
    jobs = _manager(tmp_path, ray)
    outside = tmp_path / "elsewhere"
    for out in (outside, tmp_path / "out" / "run"):
        out.mkdir()
        (out / "job.json").write_text(json.dumps({"inputs": ["a.tar", "b.tar"], "human": []}))
    ray.add("outside", "RUNNING", {"capfilt": "clean", "output": str(outside)})
    ray.add("dotdot", "RUNNING", {"capfilt": "clean", "output": f"{tmp_path}/out/../elsewhere"})
    ray.add("relative", "RUNNING", {"capfilt": "clean", "output": "elsewhere"})
    ray.add("inside", "RUNNING", {"capfilt": "clean", "output": str(tmp_path / "out" / "run")})
    for job_id in ("outside", "dotdot", "relative"):
        assert jobs.get(job_id).progress is None, job_id
    progress = jobs.get("inside").progress
    assert progress is not None and progress.shards_total == 2


def test_an_ended_job_whose_output_a_later_job_took_on_shows_no_progress(tmp_path: Path) -> None:
    """Progress is counted from the output: once a later job resumed it, those counts are that
    job's work too, and the stopped job showed them as its own (40 of 40 shards)."""
    from capfilt.model.checkpoint import load_checkpoint
    from capfilt.pipelines.clean import job_record
    from capfilt.services.jobs import _check_with_the_cli, clean_argv

    ray = FakeRayJobs()
    jobs = _manager(tmp_path, ray)
    argv = clean_argv(_request(tmp_path, "run"), jobs.config)
    first = jobs.submit(_request(tmp_path, "run"))
    out = tmp_path / "out" / "run"
    out.mkdir()  # what the job writes first
    inputs = argv[argv.index("--input") + 1 : argv.index("--output")]
    ids = [load_checkpoint(WEIGHTS / role).digest for role in ("captioner", "filter")]
    (out / "job.json").write_text(json.dumps(job_record(_check_with_the_cli(argv)[0], inputs, [], *ids)))
    assert jobs.get(first.id).progress is not None
    ray.jobs[first.id].status = "STOPPED"
    assert jobs.get(first.id).progress is not None  # no later job: the output is this job's
    ray.jobs[first.id].start_time -= 1000
    later = jobs.submit(_request(tmp_path, "run", resume=True))
    stopped = jobs.get(first.id)
    assert stopped.progress is None and f"taken on by job {later.id}" in (stopped.message or "")
    assert jobs.get(later.id).progress is not None


def test_a_succeeded_job_shows_the_summary_its_output_holds(tmp_path: Path) -> None:
    ray = FakeRayJobs()
    jobs = _manager(tmp_path, ray)
    job = jobs.submit(_request(tmp_path, "run"))
    out = tmp_path / "out" / "run"
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"inputs": ["a.tar"], "human": []}))
    summary = {"output": str(out), "dprime_pairs": 7, "threshold": 0.5}
    (out / "summary.json").write_text(json.dumps(summary))
    ray.jobs[job.id].status = "RUNNING"
    assert jobs.get(job.id).summary is None  # a run's summary.json is an earlier run's until it ends
    ray.jobs[job.id].status = "SUCCEEDED"
    assert jobs.get(job.id).summary == summary
    (out / "summary.json").write_text("{cut")
    assert jobs.get(job.id).summary is None
    # Shown as it is, so never another file's JSON: one planted in the output, or reached by a link.
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"output": str(out), "private_key": "..."}))
    (out / "summary.json").unlink()
    (out / "summary.json").symlink_to(secret)
    assert jobs.get(job.id).summary is None
    (out / "summary.json").unlink()
    (out / "summary.json").write_text(json.dumps({"type": "service_account", "private_key": "..."}))
    assert jobs.get(job.id).summary is None


def test_a_stop_says_it_was_requested(tmp_path: Path) -> None:
    jobs = _manager(tmp_path, FakeRayJobs())
    job = jobs.submit(_request(tmp_path, "run"))
    jobs.client.jobs[job.id].status = "RUNNING"
    stopping = jobs.stop(job.id)
    assert stopping.state == "RUNNING" and stopping.message.startswith("Stop requested")


def test_overlap_checks_and_submissions_at_once_never_break_on_the_submitted_jobs(tmp_path: Path) -> None:
    """The overlap check outside the submission lock read and pruned the service's memory of jobs
    Ray Jobs does not list yet while a submission added to it: a KeyError or "dictionary changed
    size during iteration" answered a client with a 500."""
    import sys

    ray = FakeRayJobs(listed_after_s=0.001)
    jobs = _manager(tmp_path, ray)
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:

        def submit(i: int) -> None:
            try:
                jobs.submit(_request(tmp_path, f"run{i}"))
                jobs.unfinished_outputs()
            except ClientError:
                pass
            except Exception as err:
                errors.append(err)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(200)))
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[tuple[TestClient, FakeRayJobs]]:
    ray = FakeRayJobs()
    jobs = _manager(tmp_path, ray)
    with TestClient(create_app(jobs.config, None, jobs), raise_server_exceptions=False) as client:
        yield client, ray


def test_job_bodies_are_refused_as_the_error_table_says(
    tmp_path: Path, app_client: tuple[TestClient, FakeRayJobs]
) -> None:
    client, ray = app_client
    body = json.dumps({"input": [str(tmp_path / "in")], "output": str(tmp_path / "out" / "run")})
    as_json = {"Content-Type": "application/json"}
    answers = {
        "empty": client.post("/v1/jobs", content=b"", headers=as_json),
        "no_body_no_type": client.post("/v1/jobs"),
        "invalid_json": client.post("/v1/jobs", content=b"{", headers=as_json),
        "array": client.post("/v1/jobs", content=b"[]", headers=as_json),
        "no_type": client.post("/v1/jobs", content=body.encode()),
        "text": client.post("/v1/jobs", content=body.encode(), headers={"Content-Type": "text/plain"}),
        "form": client.post("/v1/jobs", data={"input": "x", "output": "y"}),
        "multipart": client.post("/v1/jobs", files={"input": ("a", b"x")}),
    }
    expected = {
        "empty": (400, "the request body is empty"),
        "no_body_no_type": (400, "the request body is empty"),
        "invalid_json": (400, "not valid JSON"),
        "array": (400, "must be an object with the fields of JobRequest"),
        "no_type": (415, "no Content-Type: send application/json"),
        "text": (415, "unsupported Content-Type 'text/plain': send application/json"),
        "form": (415, "unsupported Content-Type 'application/x-www-form-urlencoded'"),
        "multipart": (415, "unsupported Content-Type 'multipart/form-data': send application/json"),
    }
    for name, response in answers.items():
        status, words = expected[name]
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["detail"], (name, response.text)
    assert not ray.jobs
    missing = client.post("/v1/jobs", json={"output": str(tmp_path / "out" / "run")})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "input"]
    first = client.post("/v1/jobs", content=body.encode(), headers=as_json)
    again = client.post("/v1/jobs", content=body.encode(), headers=as_json)
    assert first.status_code == 201, first.text
    assert again.status_code == 409 and again.json()["reason"] == "output_in_use", again.text
    request_body = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert list(request_body["content"]) == ["application/json"]
    assert "output" in request_body["content"]["application/json"]["schema"]["properties"]


def test_metrics_leave_job_counts_out_when_ray_jobs_cannot_answer(
    app_client: tuple[TestClient, FakeRayJobs],
) -> None:
    """Zeros would read as "no job failed" to `capfilt_jobs{state="FAILED"} > 0`; no series and
    capfilt_jobs_up 0 say "not known" as Prometheus users expect."""
    client, ray = app_client
    ray.add("failed", "FAILED", {"capfilt": "clean", "output": "/x"})
    text = client.get("/metrics").text
    assert 'capfilt_jobs{state="FAILED"} 1.0' in text and 'capfilt_jobs{state="RUNNING"} 0.0' in text
    assert "capfilt_jobs_up 1.0" in text
    ray.down = True
    text = client.get("/metrics").text
    assert "capfilt_jobs{" not in text
    assert "capfilt_jobs_up 0.0" in text


def test_a_service_that_started_its_own_ray_names_the_jobs_that_stop_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its Ray ends with it, and the jobs on it: each is named with how to finish it."""
    from capfilt.services.serve_cli import _say_which_jobs_stop

    jobs = _manager(tmp_path, FakeRayJobs())
    job = jobs.submit(_request(tmp_path, "run"))
    with caplog.at_level("WARNING"):
        _say_which_jobs_stop(jobs)
    named = (
        "stops with this service's Ray unless it had ended; submit it again with "
        f'"resume": true and output {tmp_path / "out" / "run"} to finish it'
    )
    assert [r.getMessage() for r in caplog.records] == [f"job {job.id} (PENDING) {named}"]
    jobs.client.down = True  # a stop sent to the process group took the dashboard down too
    caplog.clear()
    with caplog.at_level("WARNING"):
        _say_which_jobs_stop(jobs)
    assert "could not list the jobs that stop with this service" in caplog.text
    assert caplog.records[-1].getMessage() == f"job {job.id} (state unknown) {named}"
