"""`capfilt clean` jobs through Ray Jobs: submit, list, watch, read logs, stop.

A job request becomes the `capfilt clean` command line, parsed by the command's own parser and
checked by `CleanConfig.validate`, so REST and CLI jobs are one job config. Ray Jobs runs that
command (`python -m capfilt.cli clean ...`) as the job's driver, which joins the cluster through
the RAY_ADDRESS Ray Jobs sets; the job shows in the Ray dashboard like any other.

Paths are confined: every input (after expanding directories and globs, so a symlink inside a root
cannot lead out of it), human shard and checkpoint must resolve under an input root, the output
under an output root. Resolving follows symlinks and `..`. Only local paths are accepted. A
checkpoint a request names is loaded once, as `capfilt clean` does before any work, so a wrong
path or role is a 400 at submission, not a job that fails later.

One output, one running job: a submission whose output equals, contains or lies inside the output
of an unfinished job (PENDING or RUNNING) is a 409, checked and submitted under one lock.

Progress is read from the job's output directory without touching it: manifest.jsonl lists the
finished shards, stats/ holds their counts, job.json the shards in all. Jobs submitted outside the
service with the metadata `{"capfilt": "clean", "output": ...}` are listed too; their progress is
read only when that output lies under an output root.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capfilt.data import input_files
from capfilt.errors import CapfiltError
from capfilt.pipelines.clean_tables import IMAGE_ROOTS_ENV

from .config import ServeConfig
from .errors import ClientError, ServiceUnavailable
from .schemas import JobInfo, JobProgress, JobRequest, JobSummary

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
MAX_LOG_CHARS = 1_000_000
AGENT_WAIT_S = 60.0  # how long a submission waits for the cluster's job agent


def confine(path: str, roots: Sequence[Path], what: str) -> Path:
    """`path` resolved (symlinks, `..`), or ClientError 403 when it lies outside every root."""
    if "://" in path or path.startswith("file:"):
        raise ClientError(
            403,
            f"{what} {path!r}: only local paths under the service's roots are accepted",
            "path_outside_roots",
        )
    given = Path(path)
    if not given.is_absolute():
        raise ClientError(400, f"{what} {path!r}: give an absolute path", "invalid_path")
    try:
        resolved = given.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ClientError(400, f"{what} {path!r}: cannot resolve it ({err})", "invalid_path") from err
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ClientError(
            403,
            f"{what} {path!r} resolves to {resolved}, outside the allowed roots ({allowed})",
            "path_outside_roots",
        )
    return resolved


def local_path(text: str) -> Path | None:
    """`text` resolved when it is an absolute local path, else None (a job's metadata is free text)."""
    if not text or "://" in text or text.startswith("file:") or "\x00" in text:
        return None
    given = Path(text)
    if not given.is_absolute():
        return None
    try:
        return given.resolve()
    except (OSError, RuntimeError):
        return None


def overlap(output: Path, other: Path) -> str | None:
    """How `output` overlaps `other` ("is", "contains", "is inside"), or None when it does not."""
    if output == other:
        return "is"
    if output in other.parents:
        return "contains"
    if other in output.parents:
        return "is inside"
    return None


def shards_under(entries: Sequence[str], roots: Sequence[Path], what: str) -> list[str]:
    """The shards `capfilt clean` would read for `entries`, each (and its sidecar) under a root."""
    resolved = [str(confine(entry, roots, what)) for entry in entries]
    try:
        sources = list(dict.fromkeys(input_files(resolved)))
    except CapfiltError as err:
        raise ClientError(400, f"{what}: {err}", "invalid_input") from err
    for source in sources:
        confine(source, roots, what)
        sidecar = Path(source.removesuffix(".tar") + ".parquet")
        if source.endswith(".tar") and sidecar.exists():
            confine(str(sidecar), roots, f"{what} sidecar")
    return sources


def clean_argv(request: JobRequest, config: ServeConfig) -> list[str]:
    """The `capfilt clean` arguments of a request, its paths confined and resolved."""
    inputs = shards_under(request.input, config.input_roots, "input")
    human = shards_under(request.human, config.input_roots, "human") if request.human else []
    captioner = (
        str(confine(request.captioner, config.input_roots, "captioner"))
        if request.captioner
        else config.captioner
    )
    filt = str(confine(request.filter, config.input_roots, "filter")) if request.filter else config.filter
    output = confine(request.output, config.output_roots, "output")
    if output.exists() and not output.is_dir():
        raise ClientError(
            409, f"output {request.output} is a file; give a directory", "output_not_a_directory"
        )
    if output.is_dir() and any(output.iterdir()) and not request.resume:
        raise ClientError(
            409,
            f"output {request.output} is not empty: choose a new directory, or set resume to continue its job",
            "output_not_empty",
        )
    argv = ["clean", "--input", *inputs, "--output", str(output), "--captioner", captioner, "--filter", filt]
    if human:
        argv += ["--human", *human]
    if request.threshold is not None:
        argv += ["--threshold", repr(request.threshold)]
    if request.keep_fraction is not None:
        argv += ["--keep-fraction", repr(request.keep_fraction)]
    argv += ["--num-captions", str(request.num_captions), "--top-p", repr(request.top_p)]
    argv += ["--top-k", str(request.top_k)]
    if request.batch_size is not None:
        argv += ["--batch-size", str(request.batch_size)]
    if request.num_gpus is not None:
        argv += ["--num-gpus", repr(request.num_gpus)]
    if request.captioner_actors is not None:
        argv += ["--captioner-actors", str(request.captioner_actors)]
    if request.filter_actors is not None:
        argv += ["--filter-actors", str(request.filter_actors)]
    if request.writers is not None:
        argv += ["--writers", str(request.writers)]
    argv += ["--seed", str(request.seed), "--precision", request.precision]
    argv += ["--resume"] if request.resume else []
    # the service's own checkpoints were checked when it started (ServeConfig.validate)
    checkpoints = [(captioner, "caption", "captioner")] if request.captioner else []
    checkpoints += [(filt, "score", "filter")] if request.filter else []
    clean_config, digests = _check_with_the_cli(argv, checkpoints)
    _check_inputs(inputs, human)
    if request.resume and output.is_dir() and any(output.iterdir()):
        if not (output / "job.json").is_file():  # what `capfilt clean --resume` refuses before any work
            raise ClientError(
                409,
                f"output {request.output} holds files but no job.json: it is not a clean job's output; "
                "choose a new directory",
                "output_not_a_job",
            )
        # the job refuses other weights than its output's: the service's own checkpoints too
        for path, task, option in ((captioner, "caption", "captioner"), (filt, "score", "filter")):
            if option not in digests:
                digests[option] = _inspect(path, task, option).digest
        _check_resumable(output, clean_config, inputs, human, digests["captioner"], digests["filter"])
    return argv


def _check_inputs(inputs: list[str], human: list[str]) -> None:
    """400 for inputs `capfilt clean` refuses before any work (a parquet that is no image table),
    as the job would, not a job that fails once started."""
    from capfilt.pipelines.clean import input_shards

    try:
        input_shards(inputs, "input", 0, "web")
        if human:
            input_shards(human, "human", 0, "human")
    except CapfiltError as err:
        raise ClientError(400, f"invalid job: {err}", "invalid_input") from err


def _check_resumable(
    output: Path, config: Any, inputs: list[str], human: list[str], captioner_id: str, filter_id: str
) -> None:
    """A resume whose arguments or checkpoints (by digest) differ from those the output's job was
    started with is refused now, not accepted and then failed by the job."""
    from capfilt.pipelines.clean import job_record
    from capfilt.pipelines.clean_output import changed_job_arguments

    try:
        saved = json.loads((output / "job.json").read_text())
    except (OSError, ValueError, RecursionError):
        return  # the job itself says what is wrong with it
    diff = changed_job_arguments(saved, job_record(config, inputs, human, captioner_id, filter_id))
    if diff:
        raise ClientError(
            409,
            f"output {output} holds a job started with other arguments ({'; '.join(diff)}): resume it "
            "with those, or choose a new output",
            "resume_mismatch",
        )


def _inspect(path: str, task: str, option: str) -> Any:
    """A checkpoint loaded as `capfilt clean` loads it before any work (`inspect_checkpoint`)."""
    from capfilt.pipelines.clean import inspect_checkpoint

    try:
        return inspect_checkpoint(path, task, option)
    except CapfiltError as err:  # "--filter PATH: checkpoint PATH is a captioner ...; pass a filter ..."
        raise ClientError(
            400, f"invalid job (options named as `capfilt clean` flags): {err}", "invalid_checkpoint"
        ) from err


def _check_with_the_cli(
    argv: list[str], checkpoints: Sequence[tuple[str, str, str]] = ()
) -> tuple[Any, dict[str, str]]:
    """Parse `argv` with `capfilt clean`'s own parser, validate its CleanConfig and load each
    (path, task, option) of `checkpoints` as the command does before any work; returns the config
    and those checkpoints' digests by option."""
    from capfilt.pipelines.clean_cli import add_clean_parser, config_from_args

    parser = argparse.ArgumentParser(prog="capfilt", exit_on_error=False)
    add_clean_parser(parser.add_subparsers(dest="command"))
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        raise ClientError(400, f"the job's options do not parse as `capfilt clean`: {err}") from err
    config = config_from_args(args)
    try:
        config.validate()
    except CapfiltError as err:
        raise ClientError(400, f"invalid job (options named as `capfilt clean` flags): {err}") from err
    return config, {option: _inspect(path, task, option).digest for path, task, option in checkpoints}


def read_progress(output: Path) -> JobProgress | None:
    """Counts over the finished shards of a job's output; None before the job has started writing.

    Read-only on purpose: the job appends to manifest.jsonl while this reads it, so a last line
    without its newline is simply not counted yet."""
    manifest = output / "manifest.jsonl"
    job = output / "job.json"
    if not job.is_file() and not manifest.is_file():
        return None
    total = None
    try:
        saved = json.loads(job.read_text())
        total = len(saved.get("inputs", [])) + len(saved.get("human", []))
    except (OSError, ValueError):
        pass
    entries: list[dict[str, Any]] = []
    try:
        text = manifest.read_text() if manifest.is_file() else ""
    except OSError:
        text = ""
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    counts = Counter[str]()
    read_errors: dict[str, str] = {}
    for entry in {e.get("shard"): e for e in entries}.values():
        counts["dprime_pairs"] += int(entry.get("dprime_pairs", 0))
        try:
            stats = json.loads((output / "stats" / f"{entry['shard']}.json").read_text())
        except (OSError, ValueError, KeyError):
            continue
        if stats.get("read_error"):  # web or human: a shard cut short or corrupt, read up to there
            read_errors[str(stats.get("input", entry.get("shard")))] = str(stats["read_error"])
        if entry.get("kind") != "web":
            continue
        counts["samples"] += int(stats.get("samples", 0))
        counts["web_kept"] += int(stats.get("web_kept", 0))
        counts["synthetic_kept"] += int(stats.get("synthetic_kept", 0))
        status.update(stats.get("status", {}))
        reasons.update(stats.get("reasons", {}))
    return JobProgress(
        shards_total=total,
        shards_done=len({e.get("shard") for e in entries}),
        samples_done=counts["samples"],
        web_kept=counts["web_kept"],
        synthetic_kept=counts["synthetic_kept"],
        dprime_pairs=counts["dprime_pairs"],
        status=dict(sorted(status.items())),
        reasons=dict(sorted(reasons.items())),
        read_errors=dict(sorted(read_errors.items())),
    )


MAX_SUMMARY_BYTES = 16 * 2**20  # a job's summary names each unreadable shard: big jobs, big files


def read_summary(output: Path, named: str) -> dict[str, Any] | None:
    """OUT/summary.json, which a job writes when it has finished (and removes when a rerun starts),
    when it is the summary of the job whose output is `named`; None otherwise. Shown to clients as
    it is, so it is read only as a regular file (never through a symbolic link someone put in an
    output folder, to a file elsewhere) and only when it names this output."""
    from capfilt.pipelines.clean import SUMMARY

    try:
        fd = os.open(output / SUMMARY, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = f.read(MAX_SUMMARY_BYTES + 1)
        loaded = json.loads(data) if len(data) <= MAX_SUMMARY_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    return loaded if isinstance(loaded, dict) and loaded.get("output") == named else None


def require_jobs_enabled(config: ServeConfig) -> None:
    """403 jobs_disabled unless the service was started with input and output roots."""
    if not config.jobs_enabled:
        raise ClientError(
            403,
            "jobs are disabled on this service: start it with --input-root and --output-root",
            "jobs_disabled",
        )


class JobManager:
    """CapFilt's jobs on one Ray cluster, through Ray's own JobSubmissionClient.

    Only cleaning jobs (metadata `capfilt: clean`: the ones this service submits, and those
    submitted with that metadata by `ray job submit` or a RayJob) are visible through it: other
    Ray jobs on the cluster cannot be read or stopped over REST."""

    def __init__(self, config: ServeConfig, dashboard_url: str) -> None:
        self.config = config
        self.dashboard_url = dashboard_url.rstrip("/")
        self._client: Any = None
        # one submission at a time: the check that no unfinished job writes there, then the submit
        self._submitting = threading.Lock()
        self._submitted: dict[str, Path] = {}  # job id -> output, until Ray Jobs lists the job
        self.submitted_here: dict[str, Path] = {}  # every job this process submitted -> its output
        self._submitted_lock = threading.Lock()  # the overlap check reads it outside `_submitting`

    @property
    def client(self) -> Any:  # JobSubmissionClient: created on first use, when the dashboard is up
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.dashboard_url)
            except (ConnectionError, RuntimeError, OSError) as err:
                raise ServiceUnavailable(
                    f"Ray Jobs at {self.dashboard_url} cannot be reached: {err}"
                ) from err
        return self._client

    def link(self, job_id: str) -> str:
        return f"{self.dashboard_url}/#/jobs/{job_id}"

    def _require_enabled(self) -> None:
        require_jobs_enabled(self.config)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on the JobSubmissionClient, its errors as the service's."""
        try:
            return fn(*args)
        except RuntimeError as err:
            if args and ("does not exist" in str(err) or "404" in str(err)):
                raise ClientError(404, f"no job {args[0]!r}", "job_not_found") from err
            raise ServiceUnavailable(f"Ray Jobs could not {what}: {err}") from err
        except (ConnectionError, OSError) as err:
            raise ServiceUnavailable(f"Ray Jobs at {self.dashboard_url} cannot be reached: {err}") from err

    def submit(self, request: JobRequest) -> JobInfo:
        self._require_enabled()
        # A running job's output is named as such, resume or not (before, a non-empty one without
        # resume was only "not empty"); checked again below, with no submission in between.
        self._refuse_overlap(request.output, confine(request.output, self.config.output_roots, "output"))
        argv = clean_argv(request, self.config)
        output = argv[argv.index("--output") + 1]
        with self._submitting:
            self._refuse_overlap(request.output, Path(output))
            job_id = self._submit(argv, output)
            with self._submitted_lock:
                self._submitted[job_id] = self.submitted_here[job_id] = Path(output)
        return self.get(job_id)

    def unfinished_outputs(self) -> dict[str, tuple[str, Path]]:
        """job id -> (state, output) of every cleaning job not finished, as Ray Jobs lists them, and
        of those this service submitted that Ray Jobs does not list yet."""
        jobs = self._call("list jobs", self.client.list_jobs)
        listed = {d.submission_id: d for d in jobs if d.submission_id}
        with self._submitted_lock:
            for job_id in [j for j in self._submitted if j in listed]:
                del self._submitted[job_id]  # Ray Jobs answers for it from now on
            unfinished = {job_id: ("PENDING", out) for job_id, out in self._submitted.items()}
        for job_id, details in listed.items():
            state = str(getattr(details.status, "value", details.status))
            metadata = details.metadata or {}
            output = local_path(str(metadata.get("output", "")))
            if metadata.get("capfilt") == "clean" and state not in TERMINAL and output is not None:
                unfinished[job_id] = (state, output)
        return unfinished

    def _refuse_overlap(self, given: str, output: Path) -> None:
        """409 when `output` is, contains or lies inside the output of an unfinished job."""
        for job_id, (state, other) in sorted(self.unfinished_outputs().items()):
            how = overlap(output, other)
            if how is not None:
                raise ClientError(
                    409,
                    f"output {given} {how} the output of job {job_id} ({state}, writing to {other}): "
                    f"wait for it to end, stop it (DELETE /v1/jobs/{job_id}), or choose another directory",
                    "output_in_use",
                )

    def _submit(self, argv: list[str], output: str) -> str:
        """Submit `capfilt clean argv` to Ray Jobs; returns the job's id."""
        entrypoint = shlex.join([self.config.job_python, "-m", "capfilt.cli", *argv])
        job_id = f"capfilt_clean_{uuid.uuid4().hex[:16]}"
        metadata = {"capfilt": "clean", "output": output}
        # The input tables' image paths are confined too: the job reads them only under the roots.
        runtime_env = {
            "env_vars": {IMAGE_ROOTS_ENV: os.pathsep.join(str(r) for r in self.config.input_roots)}
        }
        client = self.client
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client.submit_job(
                    entrypoint=entrypoint, submission_id=job_id, metadata=metadata, runtime_env=runtime_env
                )
                break
            except RuntimeError as err:  # a fresh cluster's job agent registers a few seconds late
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise ServiceUnavailable(f"Ray Jobs could not submit the job: {err}") from err
                time.sleep(1.0)
            except (ConnectionError, OSError) as err:
                raise ServiceUnavailable(
                    f"Ray Jobs at {self.dashboard_url} cannot be reached: {err}"
                ) from err
        log.info("submitted %s: %s", job_id, entrypoint)
        return job_id

    def _details(self, job_id: str) -> Any:
        self._require_enabled()
        if not JOB_ID.match(job_id):
            raise ClientError(
                404, f"no job {job_id!r}: job ids hold letters, digits, '_' and '-'", "job_not_found"
            )
        details = self._call("read the job", self.client.get_job_info, job_id)
        if (details.metadata or {}).get("capfilt") != "clean":
            raise ClientError(
                404, f"no CapFilt job {job_id!r} (it is not a job this service submitted)", "job_not_found"
            )
        return details

    def _summary(self, details: Any) -> dict[str, Any]:
        job_id = details.submission_id or details.job_id
        return {
            "id": job_id,
            "state": str(getattr(details.status, "value", details.status)),
            "output": details.metadata.get("output", ""),
            "submitted_at": details.start_time / 1000 if details.start_time else None,
            "ended_at": details.end_time / 1000 if details.end_time else None,
            "dashboard": self.link(job_id),
        }

    def list(self) -> list[JobSummary]:
        self._require_enabled()
        jobs = self._call("list jobs", self.client.list_jobs)
        ours = [d for d in jobs if (d.metadata or {}).get("capfilt") == "clean" and d.submission_id]
        ours.sort(key=lambda d: d.start_time or 0, reverse=True)
        return [JobSummary(**self._summary(d)) for d in ours]

    def get(self, job_id: str, message: str | None = None) -> JobInfo:
        details = self._details(job_id)
        summary = self._summary(details)
        output = self._readable_output(summary["output"])
        progress = read_progress(output) if output is not None else None
        message, result = message or details.message, None
        if summary["state"] in TERMINAL and progress is not None:
            later = self._later_job_on(output, details)
            if later is not None:  # the output's counts are the later job's work too, not this job's
                progress = None
                message = f"{message or ''} Its output was taken on by job {later}: see that job's progress.".strip()
            elif summary["state"] == "SUCCEEDED":
                result = read_summary(output, summary["output"])
        return JobInfo(
            **summary, message=message, entrypoint=details.entrypoint, progress=progress, summary=result
        )

    def _later_job_on(self, output: Path, details: Any) -> str | None:
        """The newest cleaning job submitted after `details`' job with the same output, if any."""
        started = details.start_time or 0
        later = [
            d
            for d in self._call("list jobs", self.client.list_jobs)
            if (d.metadata or {}).get("capfilt") == "clean"
            and d.submission_id
            and d.submission_id != details.submission_id
            and (d.start_time or 0) > started
            and local_path(str(d.metadata.get("output", ""))) == output
        ]
        return max(later, key=lambda d: d.start_time or 0).submission_id if later else None

    def _readable_output(self, text: str) -> Path | None:
        """A job's output as its metadata names it, resolved, when it lies under an output root: the
        metadata of a job submitted outside the service is whatever its submitter wrote."""
        output = local_path(text)
        roots = self.config.output_roots
        if output is None or not any(output == r or r in output.parents for r in roots):
            return None
        return output

    def logs(self, job_id: str, tail: int | None = None) -> str:
        self._details(job_id)
        text = self._call("read the logs", self.client.get_job_logs, job_id)
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:]) if tail > 0 else ""
        return text[-MAX_LOG_CHARS:]

    def stop(self, job_id: str) -> JobInfo:
        details = self._details(job_id)
        state = str(getattr(details.status, "value", details.status))
        if state in TERMINAL:
            raise ClientError(409, f"job {job_id} has already ended: {state}", "job_ended")
        self._call("stop the job", self.client.stop_job, job_id)
        # Ray's message still says "running": the driver stops within seconds (state STOPPED)
        return self.get(job_id, message="Stop requested: the job stops within seconds, then reads STOPPED.")

    def counts_by_state(self) -> dict[str, int] | None:
        """Cleaning jobs by state, for /metrics: {} when jobs are off, None when Ray Jobs cannot answer."""
        if not self.config.jobs_enabled:
            return {}
        try:
            return dict(Counter(s.state for s in self.list()))
        except (ServiceUnavailable, ClientError) as err:
            log.warning("jobs by state unavailable: %s", err)
            return None
