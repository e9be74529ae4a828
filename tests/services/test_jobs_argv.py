"""A REST job request becomes the `capfilt clean` command line with every option it names."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from capfilt.pipelines.clean_cli import add_clean_parser, config_from_args
from capfilt.pipelines.clean_resources import MAX_WRITERS
from capfilt.services.config import ServeConfig
from capfilt.services.errors import ClientError
from capfilt.services.jobs import clean_argv
from capfilt.services.schemas import JobRequest


def _serve(tmp_path: Path) -> ServeConfig:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(b"")
    (tmp_path / "out").mkdir()
    return ServeConfig(
        captioner="cap", filter="filt", input_roots=(tmp_path / "in",), output_roots=(tmp_path / "out",)
    )


def _parsed(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_clean_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(argv))


def test_every_job_option_reaches_the_clean_command(tmp_path: Path) -> None:
    serve = _serve(tmp_path)
    request = JobRequest(
        input=[str(tmp_path / "in")],
        output=str(tmp_path / "out" / "job"),
        keep_fraction=0.4,
        num_captions=3,
        top_p=0.8,
        top_k=7,
        batch_size=5,
        num_gpus=0.5,
        captioner_actors=2,
        filter_actors=3,
        writers=4,
        seed=11,
        precision="fast",
        resume=True,
    )
    config = _parsed(clean_argv(request, serve))
    assert config.inputs == [str((tmp_path / "in" / "00000.tar").resolve())]
    assert (config.keep_fraction, config.threshold, config.num_captions) == (0.4, None, 3)
    assert (config.top_p, config.top_k, config.batch_size, config.num_gpus) == (0.8, 7, 5, 0.5)
    assert (config.captioner_actors, config.filter_actors, config.seed, config.writers) == (2, 3, 11, 4)
    assert (config.precision, config.resume, config.captioner, config.filter) == ("fast", True, "cap", "filt")
    default = _parsed(
        clean_argv(JobRequest(input=[str(tmp_path / "in")], output=str(tmp_path / "out" / "j")), serve)
    )
    assert (default.top_k, default.precision, default.threshold, default.resume) == (50, "exact", None, False)
    assert (default.num_gpus, default.captioner_actors, default.filter_actors, default.writers) == (
        None,
        None,
        None,
        None,
    )  # the job's choice


def test_bad_sampling_and_precision_are_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match="precision"):
        JobRequest(input=["x"], output="y", precision="half")
    with pytest.raises(ValueError, match="top_k"):
        JobRequest(input=["x"], output="y", top_k=-1)
    with pytest.raises(ValueError, match="writers"):  # the schema allows what `clean` does
        JobRequest(input=["x"], output="y", writers=MAX_WRITERS + 1)
    assert JobRequest(input=["x"], output="y", writers=MAX_WRITERS).writers == MAX_WRITERS


def test_a_non_empty_output_without_resume_is_a_conflict(tmp_path: Path) -> None:
    serve = _serve(tmp_path)
    (tmp_path / "out" / "job").mkdir()
    (tmp_path / "out" / "job" / "job.json").write_text("{}")
    with pytest.raises(ClientError, match="not empty"):
        clean_argv(JobRequest(input=[str(tmp_path / "in")], output=str(tmp_path / "out" / "job")), serve)


def test_submitted_jobs_read_table_image_paths_only_under_the_input_roots(tmp_path: Path) -> None:
    """Shards are confined before submission; the image paths inside a table are read by the job,
    so the job is told the roots (its runtime environment) and refuses paths outside them."""
    from capfilt.pipelines.clean_tables import IMAGE_ROOTS_ENV
    from capfilt.services.jobs import JobManager

    class Submitted(Exception):
        pass

    class Client:
        def list_jobs(self):
            return []

        def submit_job(self, **kwargs):
            raise Submitted(kwargs)

    serve = _serve(tmp_path)
    jobs = JobManager(serve, "http://127.0.0.1:9")
    jobs._client = Client()
    with pytest.raises(Submitted) as sent:
        jobs.submit(JobRequest(input=[str(tmp_path / "in")], output=str(tmp_path / "out" / "job")))
    env = sent.value.args[0]["runtime_env"]["env_vars"]
    assert env == {IMAGE_ROOTS_ENV: str(tmp_path / "in")}


def test_a_resume_with_other_arguments_or_checkpoints_is_refused_at_submission(tmp_path: Path) -> None:
    """The output's job.json names the arguments and checkpoint digests its job started with: a
    resume that changes one is a 409 naming it (it used to be accepted, then failed by the job:
    for the checkpoints, also when the service's own were replaced since); the default threshold
    and an explicit 0.5 are the same job, and so are no precision and "exact"."""
    import json

    from capfilt.model.checkpoint import load_checkpoint
    from capfilt.pipelines.clean import job_record

    weights = Path(__file__).resolve().parents[2] / "capfilt" / "weights" / "small"
    serve = _serve(tmp_path)
    serve = ServeConfig(
        captioner=str(weights / "captioner"),
        filter=str(weights / "filter"),
        input_roots=serve.input_roots,
        output_roots=serve.output_roots,
    )
    ids = [load_checkpoint(weights / role).digest for role in ("captioner", "filter")]
    output = tmp_path / "out" / "job"
    output.mkdir()
    inputs = [str((tmp_path / "in" / "00000.tar").resolve())]
    started = _parsed(
        ["clean", "--input", *inputs, "--output", str(output), "--captioner", "c", "--filter", "f"]
    )
    (output / "job.json").write_text(json.dumps(job_record(started, inputs, [], *ids)))
    same = JobRequest(input=[str(tmp_path / "in")], output=str(output), resume=True, threshold=0.5)
    assert "--resume" in clean_argv(same, serve)
    other = JobRequest(input=[str(tmp_path / "in")], output=str(output), resume=True, seed=5)
    with pytest.raises(
        ClientError, match=r"started with other arguments \(seed: saved 0, now 5\)"
    ) as refused:
        clean_argv(other, serve)
    assert (refused.value.status, refused.value.reason) == (409, "resume_mismatch")
    fast = JobRequest(input=[str(tmp_path / "in")], output=str(output), resume=True, precision="fast")
    with pytest.raises(ClientError, match=r"precision: saved 'exact', now 'fast'"):
        clean_argv(fast, serve)
    (output / "job.json").write_text(json.dumps(job_record(started, inputs, [], "sha256:aa", ids[1])))
    with pytest.raises(ClientError, match=rf"captioner_id: saved 'sha256:aa', now '{ids[0]}'") as refused:
        clean_argv(same, serve)
    assert (refused.value.status, refused.value.reason) == (409, "resume_mismatch")


def test_an_input_that_clean_refuses_before_any_work_is_a_400(tmp_path: Path) -> None:
    """A parquet that is no image table: the job fails on it before any work, so the service
    refuses it at submission (it used to accept it and the job failed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    serve = _serve(tmp_path)
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "in" / "numbers.parquet")
    request = JobRequest(
        input=[str(tmp_path / "in" / "numbers.parquet")], output=str(tmp_path / "out" / "job")
    )
    with pytest.raises(ClientError, match=r"--input: .*numbers\.parquet") as refused:
        clean_argv(request, serve)
    assert (refused.value.status, refused.value.reason) == (400, "invalid_input")
    relative = JobRequest(input=["in"], output=str(tmp_path / "out" / "job"))
    with pytest.raises(ClientError, match="give an absolute path") as refused:
        clean_argv(relative, serve)
    assert (refused.value.status, refused.value.reason) == (400, "invalid_path")
