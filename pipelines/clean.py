"""`capfilt clean`: CapFilt over img2dataset shards or parquet image tables on Ray Data, writing D',
a ledger and stats.

    summary = clean(CleanConfig(inputs=["world/web"], output="runs/clean",
                                captioner="ckpt/captioner", filter="ckpt/filter"))

Inputs are resolved once, before Ray starts (`capfilt.data.input_files`): local paths, globs and
fsspec URLs of webdataset tars (with their img2dataset parquet sidecars) and of parquet image
tables, whose columns are checked here too. Each becomes a `Shard` named by its source (the
resolved local path or the URL): the ledger's `shard` column, the resume key in `job.json`.

Data flow (inputs in `clean_inputs`, stages in `clean_stages`, outputs in `clean_output`):

    input shards ─ read_shard (CPU) ─ decode_batch (CPU) ─ CaptionStage pool ─ FilterStage pool
        ─ driver: rows grouped by shard; a shard complete → D' + ledger + stats + manifest line

One Ray Data dataset covers every pending shard, so each actor loads its checkpoint once for the
whole job; a shard is finished as soon as its last row arrives (the read stage tells how many to
expect), which makes the shard the unit of resume while the job streams.

Threshold: a text is kept when its ITM p(match) exceeds `threshold` (0.5, BLIP's). With
`keep_fraction` the threshold depends on every score, so the job runs in two passes: the models
score every shard (stashed in `scored/`), `threshold_for_keep_fraction` picks the threshold over
the web and best synthetic scores, and `decide` is applied again to the stored scores (no model
runs twice) before D' is written. A resumed keep-fraction job rescores only unstashed shards and
reuses `threshold.json` once it exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from capfilt.data import PARQUET, input_files, input_format
from capfilt.decision import DEFAULT_THRESHOLD, Rule, threshold_for_keep_fraction
from capfilt.errors import CapfiltError, signals_interrupt
from capfilt.inference import PRECISIONS, capfilt_sampling
from capfilt.ledger import LEDGER_SCHEMA, MAX_SEED, judged_scores, redecide, table
from capfilt.model.generate import MAX_CAPTIONS, GenerationConfig

from .clean_output import (
    Shard,
    forget_unstarted,
    prepare,
    read_manifest,
    read_stats,
    write_json,
    write_parquet,
)
from .clean_resources import (
    MAX_WRITERS,
    ActorPlan,
    cluster_nodes,
    default_batch_size,
    default_writers,
    gpu_share_problem,
    local_cpus,
    plan_actors,
)
from .clean_tables import table_columns, table_schema
from .clean_writers import ShardWriters, starting_a_writer
from .ray_connect import connect_ray

log = logging.getLogger(__name__)

SUMMARY = "summary.json"  # OUT/summary.json: the last finished run's summary (`summary_record`)

# (shards written, shards in the job, samples scored: counted as each batch leaves the filter, and
# on a resumed job starting from the finished shards' samples)
ProgressFn = Callable[[int, int, int], None]


def effective_threshold(threshold: float | None, keep_fraction: float | None) -> float | None:
    """The threshold a job decides with, as its job.json records it: `threshold`, else 0.5 unless
    `keep_fraction` picks one from the scores (then None)."""
    if threshold is None and keep_fraction is None:
        return DEFAULT_THRESHOLD
    return threshold


@dataclass
class CleanConfig:
    """One cleaning job. Inputs are local paths or fsspec URLs: directories, globs, tars, parquet."""

    inputs: list[str]  # webdataset tars (their img2dataset sidecars are read too) or parquet image tables
    output: str  # a new or empty directory, or the job's own with `resume`
    captioner: str  # checkpoint that writes the synthetic captions
    filter: str  # checkpoint that scores web and synthetic texts (ITM with [ENC])
    human: list[str] | None = None  # human-annotated shards copied into D' as they are
    threshold: float | None = None  # keep texts with p(match) above it; None: 0.5, or keep_fraction's
    keep_fraction: float | None = None  # instead of threshold: keep this fraction of judged texts
    num_captions: int = 1  # K nucleus samples per image; the best by ITM is judged
    top_p: float = 0.9  # nucleus mass (BLIP's CapFilt: 0.9)
    top_k: int = 50  # sample among the top_k tokens only, 0 for all (BLIP's CapFilt: transformers' 50)
    # Images per model batch and per Ray Data batch; None: chosen from the device and the
    # captioner (`clean_resources.default_batch_size`: 128 for the small model on CPUs).
    batch_size: int | None = None
    # The model actors; None: chosen from the cluster's resources (`clean_resources`), GPUs when
    # it has any. num_gpus is GPUs per model actor (fractions share a GPU; 0: CPUs only).
    num_gpus: float | None = None
    captioner_actors: int | None = None
    filter_actors: int | None = None
    resume: bool = False  # continue a job in `output`: finished shards are skipped
    seed: int = 0  # a sample's sampling seed comes from (seed, key)
    precision: str = "exact"  # "fast": bf16 on GPUs (fp16 before Ampere) and AMX CPUs, int8 on other CPUs (docs/benchmarks.md)
    ray_address: str | None = None  # default: the running Ray, RAY_ADDRESS, or a new local one
    # Processes writing finished shards beside the pipeline (`clean_writers`); None: from the GPUs
    # the model actors hold (`clean_resources.default_writers`). Not part of the result.
    writers: int | None = None

    def validate(self) -> None:
        """Raise CapfiltError naming the first bad option (paths are checked by `clean`)."""

        def bad(option: str, why: str) -> CapfiltError:
            return CapfiltError(f"--{option} {why}")

        if not self.inputs:
            raise bad("input", "is required: shard directories, tar or parquet files, globs or URLs")
        if not self.output:
            raise bad("output", "is required: a new or empty directory")
        if self.threshold is not None and self.keep_fraction is not None:
            raise bad("keep-fraction", "and --threshold exclude each other: give one")
        if self.threshold is not None and not (0.0 <= self.threshold <= 1.0):
            raise bad("threshold", f"must be a probability in [0, 1]; got {self.threshold}")
        if self.keep_fraction is not None and not (0.0 < self.keep_fraction <= 1.0):
            raise bad("keep-fraction", f"must be in (0, 1]; got {self.keep_fraction}")
        if not (0 <= self.seed <= MAX_SEED):
            raise bad("seed", f"must be in [0, 2**63 - 1] (the ledger stores it as int64); got {self.seed}")
        if not 1 <= self.num_captions <= MAX_CAPTIONS:
            raise bad("num-captions", f"must be between 1 and {MAX_CAPTIONS}; got {self.num_captions}")
        if not (0.0 < self.top_p <= 1.0) or math.isnan(self.top_p):
            raise bad("top-p", f"must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise bad("top-k", f"must be >= 0 (0: no top-k cut); got {self.top_k}")
        if self.batch_size is not None and self.batch_size < 1:
            raise bad("batch-size", f"must be >= 1; got {self.batch_size}")
        if self.num_gpus is not None and (problem := gpu_share_problem(self.num_gpus)):
            raise bad("num-gpus", f"{problem}; got {self.num_gpus}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.writers is not None and not (1 <= self.writers <= MAX_WRITERS):
            raise bad("writers", f"must be in [1, {MAX_WRITERS}]; got {self.writers}")
        for name in ("captioner_actors", "filter_actors"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name.replace("_", "-"), f"must be >= 1; got {getattr(self, name)}")

    def generation(self) -> GenerationConfig:
        """BLIP's CapFilt sampling with this job's K, top-p and top-k."""
        return capfilt_sampling(
            num_captions=self.num_captions, top_p=self.top_p, top_k=self.top_k, seed=self.seed
        )


@dataclass
class CleanSummary:
    """A finished job: totals over every shard in `output` (this run's and earlier ones)."""

    output: Path
    shards_total: int
    shards_skipped: int  # finished by an earlier run
    samples: int  # ledger rows (input samples) in all
    status: dict[str, int]
    reasons: dict[str, int]
    web_kept: int
    synthetic_kept: int
    human_pairs: int
    dprime_pairs: int
    threshold: float
    captioner_id: str
    filter_id: str
    run_samples: int  # samples scored by this run
    wall_s: float
    samples_per_s: float  # this run's samples over its wall time
    timings: dict[str, float] = field(default_factory=dict)
    read_errors: dict[str, str] = field(default_factory=dict)  # shard -> what cut its reading short
    report: Path | None = None  # report.html; None when it could not be written (the job's data stands)
    resources: dict[str, Any] = field(default_factory=dict)  # the model actors this run asked Ray for


@dataclass(frozen=True)
class _Model:
    path: str
    digest: str
    image_size: int
    cache_bytes_per_image: int  # a decoder's cached image keys and values per image, fp32 (0: none)


def inspect_checkpoint(path: str, task: str, option: str) -> _Model:
    """Load a checkpoint once here, so a wrong path or role fails before Ray starts."""
    from capfilt.model.checkpoint import load_checkpoint

    if not Path(path).exists():
        raise CapfiltError(f"--{option} {path}: checkpoint not found")
    try:
        ckpt = load_checkpoint(path)
        ckpt.require(task, path)
    except ValueError as err:  # CheckpointError
        raise CapfiltError(f"--{option} {path}: {err}") from err
    config = ckpt.config
    cache = config.text.depth * 2 * (config.vision.num_patches + 1) * config.text.width * 4
    return _Model(
        str(Path(path).resolve()), ckpt.digest, config.vision.image_size, cache if config.has_decoder else 0
    )


def input_shards(entries: list[str], option: str, first_id: int, kind: str) -> list[Shard]:
    """The input shards, each once.

    A readable parquet that is no image table fails the job here, before any work: a wrong kind
    of input is the user's mistake (a wrong path or glob). A parquet whose footer cannot be read is
    damage, like a damaged tar: it is logged and the job records it as that shard's read error,
    unless no input is readable at all."""
    try:
        sources = list(dict.fromkeys(input_files(entries)))  # a shard named twice is cleaned once
        unreadable = {}
        for source in sources:
            if input_format(source) == PARQUET:
                try:
                    schema = table_schema(source)
                except CapfiltError as err:
                    unreadable[source] = err
                    continue
                table_columns(schema, source)
        if unreadable and len(unreadable) == len(sources):
            raise next(iter(unreadable.values()))
    except CapfiltError as err:
        raise CapfiltError(f"--{option}: {err}") from err
    for err in unreadable.values():
        log.warning("--%s: %s; the job goes on and records it as that shard's read error", option, err)
    return [Shard(first_id + i, source, kind) for i, source in enumerate(sources)]


def _pipeline(
    config: CleanConfig,
    plan: ActorPlan,
    shards: list[Shard],
    captioner: _Model,
    filt: _Model,
    threshold: float,
) -> Any:  # ray.data.Dataset
    """The Ray Data pipeline over `shards`: read and decode tasks, then the captioner and the
    filter actor pools; its rows are the ledger rows, with `shard_id` and `shard_rows`."""
    import ray

    from .clean_read import decode_batch, read_shard
    from .clean_stages import CaptionStage, FilterStage

    # Actors hold their CPUs (and GPUs) for the whole job; read and decode tasks get the rest.
    actor_cpus, task_cpus = plan.cpus_per_actor, plan.task_cpus
    model_args = dict(
        batch_size=config.batch_size, device=plan.device, num_cpus=actor_cpus, precision=config.precision
    )
    sizes = sorted({captioner.image_size, filt.image_size})
    ds = ray.data.from_items(
        [{"shard_id": s.id, "source": s.source} for s in shards], override_num_blocks=len(shards)
    )
    # max_calls=0 (no limit) is Ray's own default for CPU tasks. Named here, it sets these tasks'
    # remote arguments apart from the model stages', so that Ray Data fuses read and decode into
    # one task but never into the captioner's actors. With equal CPUs per task and per actor it
    # did, and the fused actor then took `batch_size` *shards* a call: a small job ran whole in one
    # call of one actor, every shard finishing at its end (4 CPUs, 12 shards: 0 rows out for 46 s).
    # (A named parameter of map_batches: Ray 2.60 deprecates the others, such as max_retries.)
    tasks = dict(batch_format="pyarrow", num_cpus=task_cpus, max_calls=0)
    ds = ds.map_batches(read_shard, batch_size=1, **tasks)
    # Whole blocks (batch_size=None): Ray fuses read and decode into one task, and a batch size
    # here would make that task bundle that many *shards*, reading the whole input in one task.
    ds = ds.map_batches(decode_batch, fn_kwargs={"sizes": sizes}, batch_size=None, **tasks)
    ds = ds.map_batches(
        CaptionStage,
        fn_constructor_kwargs=dict(
            checkpoint=captioner.path,
            image_size=captioner.image_size,
            generation=dataclasses.asdict(config.generation()),
            seed=config.seed,
            **model_args,
        ),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=actor_cpus,
        num_gpus=plan.gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=plan.captioner_actors),
    )
    ds = ds.map_batches(
        FilterStage,
        fn_constructor_kwargs=dict(
            checkpoint=filt.path,
            image_size=filt.image_size,
            threshold=threshold,
            seed=config.seed,
            **model_args,
        ),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=actor_cpus,
        num_gpus=plan.gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=plan.filter_actors),
    )
    return ds


def _score(
    config: CleanConfig,
    plan: ActorPlan,
    shards: list[Shard],
    captioner: _Model,
    filt: _Model,
    threshold: float,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[tuple[Shard, list[dict[str, Any]]]]:
    """Run the Ray Data pipeline over `shards`; yields each shard with its ledger rows as soon
    as its last row arrives (shards in completion order). `on_rows(n)` hears of every batch of n
    rows as it leaves the filter, so progress moves within a shard, not only at its end."""
    if not shards:
        return
    ds = _pipeline(config, plan, shards, captioner, filt, threshold)
    by_id = {s.id: s for s in shards}
    pending: dict[int, list[dict[str, Any]]] = {}
    before = set(threading.enumerate())
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for block in batches:
            if on_rows is not None:
                on_rows(block.num_rows)
            for row in block.to_pylist():
                shard_id, expected = row.pop("shard_id"), row.pop("shard_rows")
                rows = pending.setdefault(shard_id, [])
                rows.append(row)
                if len(rows) == expected:
                    yield by_id[shard_id], pending.pop(shard_id)
                    by_id.pop(shard_id)
    finally:  # also when the consumer stops early (an interrupt, a failed write)
        if hasattr(batches, "close"):  # Ray Data's generator: it stops its prefetch threads
            batches.close()
        _join_new_threads(before, PIPELINE_THREADS_WAIT_S)
    log.debug("Ray Data stats of the clean pipeline:\n%s", ds.stats())
    assert not pending, f"shards ended incomplete: {sorted(pending)}"
    for shard in by_id.values():  # a shard with no samples at all
        yield shard, []


PIPELINE_THREADS_WAIT_S = 2.0  # Ray Data's block Prefetcher outlives a stopped iterator: do not wait longer


def _join_new_threads(before: set[threading.Thread], timeout: float) -> None:
    """Wait (at most `timeout` s in all) for threads started since `before` (Ray Data's prefetch
    threads) to end. One still fetching a block when the driver called ray.shutdown() made Ray end
    the process with exit 1 ("The core worker has already been shutdown"), in place of the stop's
    message and exit 130, when a SIGTERM came just as the pipeline finished."""
    deadline = time.monotonic() + timeout
    started = [t for t in set(threading.enumerate()) - before if t is not threading.current_thread()]
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in started if t.is_alive()]
    if alive:
        log.debug("threads still running after the pipeline: %s", alive)


def _job(
    config: CleanConfig, web: list[Shard], human: list[Shard], cap: _Model, filt: _Model
) -> dict[str, Any]:
    """What decides the result; a resumed job must match it."""
    return job_record(config, [s.source for s in web], [s.source for s in human], cap.digest, filt.digest)


def job_record(
    config: CleanConfig, web: list[str], human: list[str], captioner_id: str, filter_id: str
) -> dict[str, Any]:
    """job.json: the arguments that decide a job's result, its shards as `input_files` lists them."""
    return {
        "inputs": web,
        "human": human,
        # The threshold in force: --threshold 0.5 and no --threshold are one job (None with --keep-fraction).
        "threshold": effective_threshold(config.threshold, config.keep_fraction),
        "keep_fraction": config.keep_fraction,
        "num_captions": config.num_captions,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "seed": config.seed,
        "captioner_id": captioner_id,
        "filter_id": filter_id,
        # Named only when not the default, so jobs written before the option resume as before.
        **({"precision": config.precision} if config.precision != "exact" else {}),
    }


def clean(config: CleanConfig, progress: ProgressFn | None = None) -> CleanSummary:
    """Clean `config.inputs` into `config.output`; see the module docstring."""
    start = time.perf_counter()
    if starting_a_writer():
        raise CapfiltError(
            "clean() was called while a shard writer process started: spawn runs the script that "
            'calls clean() again in each writer; put that call under `if __name__ == "__main__":`'
        )
    config.validate()
    web = input_shards(config.inputs, "input", 0, "web")
    human = input_shards(config.human, "human", len(web), "human") if config.human else []
    cap = inspect_checkpoint(config.captioner, "caption", "captioner")
    filt = inspect_checkpoint(config.filter, "score", "filter")
    out = Path(config.output)
    existed, empty = out.is_dir(), not out.exists() or (out.is_dir() and not any(out.iterdir()))
    done = prepare(out, _job(config, web, human, cap, filt), config.resume)
    (out / SUMMARY).unlink(missing_ok=True)  # an earlier run's: this one has not finished
    total = len(web) + len(human)
    pending = [s for s in web if s.name not in done]
    finished = read_manifest(out).values()
    state = {"shards": len(done), "samples": sum(e["samples"] for e in finished if e["kind"] == "web")}
    if done:
        log.info("resuming in %s: %d of %d shards already finished", out, len(done), total)

    def advance(shards: int, samples: int) -> None:
        state["shards"] += shards
        state["samples"] += samples
        if progress is not None:
            progress(state["shards"], total, state["samples"])

    advance(0, 0)
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            # SIGTERM while connecting stops as Ctrl-C does (until ray.init puts in its own handler,
            # which the block below replaces): before, it killed the driver and left job.json behind.
            with signals_interrupt():
                connect_ray(config.ray_address)
        except BaseException:  # an error, or a stop while connecting
            if empty:  # nothing of the job is there yet: the same command runs again after the fix
                forget_unstarted(out, existed)
            raise
    ray.data.DataContext.get_current().enable_progress_bars = progress is None
    timings: dict[str, float] = {"prepare_s": time.perf_counter() - start}
    run_samples = 0
    # The signals stay interrupts until the summary and the report are written: a SIGTERM after
    # the last shard killed the driver through Ray's handler (exit 15, no summary, no report).
    try:
        with signals_interrupt():
            try:
                plan = plan_actors(
                    cluster_nodes(), config.num_gpus, config.captioner_actors, config.filter_actors
                )
                if config.batch_size is None:
                    config = dataclasses.replace(
                        config,
                        batch_size=default_batch_size(
                            plan.device, cap.cache_bytes_per_image * config.num_captions
                        ),
                    )
                writers = config.writers or default_writers(plan, local_cpus())
                log.info(
                    "model actors: %s; %d images per model batch; %d shard writer(s)",
                    plan.as_dict(),
                    config.batch_size,
                    writers,
                )
                t0 = time.perf_counter()
                # Leaving `writing` waits for every shard handed to it (and records it).
                with ShardWriters(out, writers, on_written=lambda stats: advance(1, 0)) as writing:
                    if config.keep_fraction is None:
                        threshold = DEFAULT_THRESHOLD if config.threshold is None else config.threshold
                        # closing(): a failed write stops the Ray Data pipeline now, not when it is collected.
                        scoring = _score(
                            config, plan, pending, cap, filt, threshold, on_rows=lambda n: advance(0, n)
                        )
                        with contextlib.closing(scoring) as scored:
                            for shard, rows in scored:
                                # the first shard's time is mostly the actors' start-up
                                timings.setdefault("first_shard_s", time.perf_counter() - t0)
                                writing.web(shard, rows)
                                run_samples += len(rows)
                    else:
                        threshold, run_samples = _keep_fraction(
                            config, plan, out, pending, cap, filt, writing, advance
                        )
                    for shard in human:
                        if shard.name not in done:
                            writing.human(shard)
                timings["web_s"] = time.perf_counter() - t0
            finally:
                if started:
                    ray.shutdown()
            with signals_interrupt():  # again: ray.shutdown() puts back the default handlers
                summary = _summary(
                    out, web, human, len(done), threshold, cap, filt, run_samples, start, timings
                )
                resources = {**plan.as_dict(), "batch_size": config.batch_size, "writers": writers}
                summary = dataclasses.replace(
                    summary, report=_report(out, summary.timings), resources=resources
                )
                _write_summary(summary)
                return summary
    except KeyboardInterrupt as err:
        try:
            finished = len(read_manifest(out))
        except CapfiltError:  # a manifest damaged beyond a cut last line: the count this run kept
            finished = state["shards"]
        rest = "to write its summary and report" if finished >= total else "to clean the rest"
        scored = len(list((out / "scored").glob("*.parquet"))) if config.keep_fraction is not None else 0
        kept = (
            f" (--keep-fraction's first pass scored {scored}; the rerun keeps their scores)" if scored else ""
        )
        raise KeyboardInterrupt(
            f"clean {str(err) or 'interrupted'}: {finished} of {total} shards are finished in {out}{kept}; "
            f"rerun the same command with --resume {rest}"
        ) from err


def summary_record(s: CleanSummary) -> dict[str, Any]:
    """The summary as JSON: what `capfilt clean` prints and OUT/summary.json holds."""
    out = s.output
    return {
        "output": str(out),
        "dprime": str(out / "dprime"),
        "ledger": str(out / "ledger"),
        "manifest": str(out / "manifest.jsonl"),
        "report": str(s.report) if s.report else None,
        "shards": s.shards_total,
        "shards_skipped": s.shards_skipped,
        "samples": s.samples,
        "status": s.status,
        "reasons": s.reasons,
        "web_kept": s.web_kept,
        "synthetic_kept": s.synthetic_kept,
        "human_pairs": s.human_pairs,
        "dprime_pairs": s.dprime_pairs,
        "threshold": s.threshold,
        "captioner_id": s.captioner_id,
        "filter_id": s.filter_id,
        "read_errors": s.read_errors,  # shard -> why it could not be read to its end
        "wall_s": round(s.wall_s, 3),
        "samples_per_s": round(s.samples_per_s, 3),
        "timings": s.timings,
        "resources": s.resources,  # the model actors asked of Ray: device, counts, CPUs, GPUs, threads
    }


def _write_summary(s: CleanSummary) -> None:
    """OUT/summary.json, atomically: there once a run has finished, gone while one runs (the REST
    API shows it). A failure is logged: the job's data stands without it."""
    path = s.output / SUMMARY
    tmp = path.with_name(SUMMARY + ".tmp")
    try:
        tmp.write_text(json.dumps(summary_record(s), indent=1, allow_nan=False) + "\n")
        tmp.replace(path)
    except (OSError, ValueError) as err:
        log.warning("could not write %s: %s", path, err)


def _report(out: Path, timings: dict[str, float]) -> Path | None:
    """Write report.html from what the job wrote. The report is a view of the ledger: a failure
    here is logged, not raised, so it never costs the user a finished job."""
    from .clean_report import write_report

    t0 = time.perf_counter()
    try:
        path = write_report(out)
    except Exception as err:  # any bug in the view must not fail the job
        log.warning("could not write %s: %s", out / "report.html", err)
        return None
    timings["report_s"] = round(time.perf_counter() - t0, 3)
    return path


def _keep_fraction(
    config: CleanConfig,
    plan: ActorPlan,
    out: Path,
    pending: list[Shard],
    cap: _Model,
    filt: _Model,
    writing: ShardWriters,
    advance: Callable[[int, int], None],
) -> tuple[float, int]:
    """Pass 1: score and stash every pending shard; pass 2: pick the threshold, decide, write."""
    assert config.keep_fraction is not None
    scored = out / "scored"
    scored.mkdir(exist_ok=True)
    to_score = [s for s in pending if not (scored / f"{s.name}.parquet").is_file()]
    run_samples = 0
    scoring = _score(config, plan, to_score, cap, filt, DEFAULT_THRESHOLD, on_rows=lambda n: advance(0, n))
    with contextlib.closing(scoring) as batches:
        for shard, rows in batches:
            write_parquet(scored / f"{shard.name}.parquet", table(rows))
            run_samples += len(rows)
    saved = out / "threshold.json"
    if saved.is_file():  # a resumed job: shards already written used this one
        threshold = float(json.loads(saved.read_text())["threshold"])
    else:
        stashed = [
            r
            for f in sorted(scored.glob("*.parquet"))
            for r in pq.read_table(f, schema=LEDGER_SCHEMA).to_pylist()
        ]
        judged = judged_scores(stashed, Rule())
        threshold = threshold_for_keep_fraction(judged, config.keep_fraction)
        # "texts": the web and best synthetic texts the fraction is of; "samples": their ledger rows
        picked = {"threshold": threshold, "keep_fraction": config.keep_fraction}
        write_json(saved, {**picked, "texts": len(judged), "samples": len(stashed)})
        log.info(
            "keep fraction %.3f: threshold %.6f over %d samples",
            config.keep_fraction,
            threshold,
            len(stashed),
        )
    rule = Rule(threshold=threshold)
    for shard in pending:
        rows = pq.read_table(scored / f"{shard.name}.parquet", schema=LEDGER_SCHEMA).to_pylist()
        writing.web(shard, [redecide(r, rule) for r in rows])
    writing.drain()  # every shard recorded before its scores go
    shutil.rmtree(scored)
    return threshold, run_samples


def _summary(
    out: Path,
    web: list[Shard],
    human: list[Shard],
    skipped: int,
    threshold: float,
    cap: _Model,
    filt: _Model,
    run_samples: int,
    start: float,
    timings: dict[str, float],
) -> CleanSummary:
    web_stats = read_stats(out, [s.name for s in web])
    human_stats = read_stats(out, [s.name for s in human])
    status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for s in web_stats:
        status.update(s["status"])
        reasons.update(s["reasons"])
    wall = time.perf_counter() - start
    return CleanSummary(
        output=out,
        shards_total=len(web) + len(human),
        shards_skipped=skipped,
        samples=sum(s["samples"] for s in web_stats),
        status=dict(sorted(status.items())),
        reasons=dict(sorted(reasons.items())),
        web_kept=sum(s["web_kept"] for s in web_stats),
        synthetic_kept=sum(s["synthetic_kept"] for s in web_stats),
        human_pairs=sum(s["dprime_pairs"] for s in human_stats),
        dprime_pairs=sum(s["dprime_pairs"] for s in web_stats + human_stats),
        threshold=threshold,
        captioner_id=cap.digest,
        filter_id=filt.digest,
        run_samples=run_samples,
        wall_s=wall,
        samples_per_s=run_samples / wall if wall > 0 else 0.0,
        timings={k: round(v, 3) for k, v in timings.items()},
        read_errors={s["input"]: s["read_error"] for s in web_stats + human_stats if s.get("read_error")},
    )
