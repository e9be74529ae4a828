"""`capfilt demo`: the product on one machine, from nothing, in minutes.

    world  ── the built-in web world (`capfilt data synth`, default arguments)
    models ── the small captioner and filter shipped with CapFilt (`capfilt/weights/small`:
              the first generation of this project's own `capfilt bootstrap` on that world,
              checked against their manifest's digests); with `--train`, a short recipe trains
              the demo's own instead (pre-training on web + human pairs, then captioner and filter
              fine-tuned on human pairs), cached by recipe and world, so a second demo reuses them
    clean  ── `capfilt clean` of the web split (+ human pairs into D') on a local Ray with the
              dashboard up
    report ── kept and rejected counts by reason, the filter's precision and recall against the
              world's truth, pairs per second, where D', the ledger and the report are

The shipped checkpoints took 53 minutes of training on 2 cores (the bootstrap's recipe:
the image encoder's init, 10 epochs of pre-training, 5 of each fine-tuning); the `--train` recipe
fits in about 5 minutes and gives a weaker filter (docs/results.md, "the demo's budget").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.errors import CapfiltError

log = logging.getLogger(__name__)

Step = Callable[[str], None]  # announces a step of the demo


@dataclass(frozen=True)
class Recipe:
    """How the demo's checkpoints are trained; its digest names the cache entry."""

    size: str = "small"
    batch_size: int = 32
    pretrain_steps: int = 550
    pretrain_lr: float = 1e-3
    captioner_steps: int = 100
    filter_steps: int = 200
    finetune_lr: float = 3e-4
    seed: int = 0
    # A budget this short needs ITM to learn from the first steps (docs/results.md, "the demo's
    # budget"): batches of look-alike texts, and negatives drawn uniformly at first.
    batching: str = "similar"  # pre-training and filter fine-tuning; the captioner's LM has no negatives
    pretrain_group: int = 4
    filter_group: int = 8
    pretrain_hard_ramp: int = 550  # uniform -> BLIP's similarity-ranked draw over the whole pre-training
    filter_hard_ramp: int = 640  # the filter ends a third of the way: BLIP's draw collapses ITM this early

    def digest(self, world: dict[str, Any]) -> str:
        text = json.dumps({"recipe": dataclasses.asdict(self), "world": world}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    cache: str | None = None  # checkpoint cache; None: $CAPFILT_CACHE, else ~/.cache/capfilt
    recipe: Recipe = field(default_factory=Recipe)
    web: int = 4000  # the world (defaults of `capfilt data synth`)
    human: int = 2000
    test: int = 500
    noise: float = 0.4
    world_seed: int = 0
    threshold: float = 0.5  # BLIP's
    batch_size: int | None = None  # images per model batch in the clean job; None: the job chooses
    dashboard: bool = True
    train: bool = False  # train the recipe's checkpoints instead of using the shipped ones
    shipped: str | None = None  # shipped checkpoints' directory; None: capfilt/weights/small

    def cache_root(self) -> Path:
        if self.cache:
            return Path(self.cache)
        return Path(os.environ.get("CAPFILT_CACHE") or Path.home() / ".cache" / "capfilt")


@dataclass
class DemoResult:
    world: Path
    checkpoints: dict[str, Path]
    checkpoints_from: str  # "shipped", "cache" (trained by an earlier demo) or "trained" (now)
    clean: dict[str, Any]  # the clean job's summary, as `capfilt clean --json` prints it
    filter_quality: dict[str, Any]  # precision / recall / F1 of web-text rejections, by noise type
    dashboard_url: str | None
    stage_seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "world": str(self.world),
            "checkpoints": {k: str(v) for k, v in self.checkpoints.items()},
            "checkpoints_from": self.checkpoints_from,
            "clean": self.clean,
            "filter_quality": self.filter_quality,
            "dashboard_url": self.dashboard_url,
            "stage_seconds": self.stage_seconds,
        }


def _world_args(cfg: DemoConfig) -> dict[str, Any]:
    return {
        "web": cfg.web,
        "human": cfg.human,
        "test": cfg.test,
        "noise": cfg.noise,
        "seed": cfg.world_seed,
    }


def build_world(cfg: DemoConfig) -> Path:
    """The demo's world in OUT/world; an existing one made with the same arguments is kept."""
    from capfilt.world import read_manifest, synthesize

    path = Path(cfg.out) / "world"
    args = _world_args(cfg)
    if (path / "world.json").is_file():
        saved = read_manifest(path).get("args", {})
        if all(saved.get(k) == v for k, v in args.items()):
            return path
    synthesize(path, **args)
    return path


SHIPPED_ROLES = ("captioner", "filter")


def shipped_root() -> Path:
    import capfilt

    return Path(capfilt.__file__).resolve().parent / "weights" / "small"


def shipped_checkpoints(root: Path | None = None) -> dict[str, Path]:
    """The captioner and filter shipped with CapFilt, each file checked against the digest its
    MANIFEST.json records; a missing or changed file is an error that says how to recover."""
    from capfilt.model.checkpoint import file_digest

    root = root or shipped_root()
    manifest_path = root / "MANIFEST.json"
    recover = (
        "restore them (`git checkout -- capfilt/weights`) or train the demo's own with `capfilt demo --train`"
    )
    if not manifest_path.is_file():
        raise CapfiltError(f"no shipped checkpoints in {root} (MANIFEST.json is missing): {recover}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CapfiltError(f"{manifest_path} is not a checkpoint manifest ({err}): {recover}") from err
    for role in SHIPPED_ROLES:
        if not any(name.startswith(f"{role}/") for name in files):
            raise CapfiltError(f"{manifest_path} lists no {role} files: {recover}")
    for name, digest in sorted(files.items()):
        path = root / name
        if not path.resolve().is_relative_to(root.resolve()):
            raise CapfiltError(f"{manifest_path} names {name!r}, outside {root}: {recover}")
        if not path.is_file():
            raise CapfiltError(f"shipped checkpoint file {path} is missing: {recover}")
        if file_digest(path) != digest:
            raise CapfiltError(
                f"shipped checkpoint file {path} does not match its digest in {manifest_path} "
                f"(changed or truncated): {recover}"
            )
    return {role: root / role for role in SHIPPED_ROLES}


def ship_checkpoints(run: Path, dest: Path, note: str = "") -> dict[str, Any]:
    """Write a bootstrap run's first-generation captioner and filter (RUN/captioner, RUN/filter) into
    `dest` as the shipped checkpoints: each keeps only the text branch its role runs, with its
    training metrics, and MANIFEST.json records every file's digest and where they came from."""
    from capfilt.model.checkpoint import file_digest, for_role, load_checkpoint, save_checkpoint

    for role in SHIPPED_ROLES:
        if not (run / role / "config.json").is_file():
            raise CapfiltError(
                f"{run / role} is not a finished checkpoint: pass a `capfilt bootstrap --out RUN` directory "
                "whose first generation has finished (RUN/captioner and RUN/filter)"
            )
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for role in SHIPPED_ROLES:
        save_checkpoint(for_role(load_checkpoint(run / role), role), staging / role)
        if (run / role / "metrics.jsonl").is_file():
            shutil.copyfile(run / role / "metrics.jsonl", staging / role / "metrics.jsonl")
    files = {str(f.relative_to(staging)): file_digest(f) for f in sorted(staging.rglob("*")) if f.is_file()}
    manifest = {
        "about": "CapFilt's shipped small captioner and filter: the first generation of `capfilt bootstrap` "
        "on the built-in world's defaults, trained on this project's machines; no outside weights",
        "source_run": str(run),
        "note": note,
        "files": files,
    }
    (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)
    return manifest


def train_checkpoints(cfg: DemoConfig, world: Path, step: Step) -> tuple[dict[str, Path], bool]:
    """Pre-train, then fine-tune captioner and filter; returns their paths and whether all three
    came from the cache. An interrupted training resumes from its last state."""
    from .train import train
    from .train_config import TrainConfig

    r = cfg.recipe
    root = cfg.cache_root() / "demo" / f"{r.size}-{r.digest(_world_args(cfg))}"
    paths = {"pretrain": root / "pretrain", "captioner": root / "captioner", "filter": root / "filter"}
    budget = {"pretrain": r.pretrain_steps, "captioner": r.captioner_steps, "filter": r.filter_steps}
    reused = all(_finished(paths[k], budget[k]) for k in paths)
    web, human = str(world / "web"), str(world / "human")
    common = dict(
        size=r.size, batch_size=r.batch_size, workers=0, seed=r.seed, checkpoint_every=100, log_every=10
    )
    negatives = {
        "pretrain": dict(
            batching=r.batching, similar_group=r.pretrain_group, hard_negatives_ramp=r.pretrain_hard_ramp
        ),
        "captioner": {},
        "filter": dict(
            batching=r.batching, similar_group=r.filter_group, hard_negatives_ramp=r.filter_hard_ramp
        ),
    }
    plan = [
        ("pretrain", "pretrain", [web, human], None, r.pretrain_steps, r.pretrain_lr),
        ("captioner", "captioner", [human], paths["pretrain"], r.captioner_steps, r.finetune_lr),
        ("filter", "filter", [human], paths["pretrain"], r.filter_steps, r.finetune_lr),
    ]
    for name, task, data, init, steps, lr in plan:
        if _finished(paths[name], steps):
            step(f"{name}: reusing {paths[name]}")
            continue
        step(f"{name}: training {steps} steps of batch {r.batch_size} ({r.size} MED) into {paths[name]}")
        tc = TrainConfig(
            task=task,
            data=data,
            out=str(paths[name]),
            init=str(init) if init else None,
            steps=steps,
            lr=lr,
            **common,
            **negatives[name],
        )
        train(tc, _train_bar(name, steps))
    return paths, reused


def _finished(run: Path, steps: int) -> bool:
    """A training run that reached `steps`: its checkpoint is whole (config.json is written last)
    and its last metrics line is that step."""
    metrics = run / "metrics.jsonl"
    if not ((run / "config.json").is_file() and metrics.is_file()):
        return False
    lines = metrics.read_text().splitlines()
    try:
        return bool(lines) and int(json.loads(lines[-1])["step"]) >= steps
    except (ValueError, KeyError):
        return False


def _train_bar(name: str, total: int) -> Callable[[int, int, dict[str, float]], None]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout is the result's (`--json`)
        transient=False,
    )
    task = bar.add_task(name, total=total, losses="")

    def progress(step: int, steps: int, losses: dict[str, float]) -> None:
        if not bar.live.is_started:
            bar.start()
        text = " ".join(
            f"{k.removesuffix('_loss')} {v:.3f}" for k, v in losses.items() if k.endswith("_loss")
        )
        bar.update(task, completed=step, total=steps, losses=text)
        if step >= steps:
            bar.stop()

    return progress


def start_ray(dashboard: bool) -> tuple[str | None, bool]:
    """A local Ray for the demo (or the one already connected); returns the dashboard address
    (None without one) and whether this call started Ray (then the demo shuts it down)."""
    import ray

    if ray.is_initialized():
        return None, False
    context = ray.init(
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    url = getattr(context, "dashboard_url", None)
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return url or None, True


def filter_quality(world: Path, ledger_dir: Path) -> dict[str, Any]:
    """Precision and recall of the job's web-text rejections against the world's truth."""
    import pyarrow.parquet as pq

    from capfilt.evaluation import filter_report

    from .evaluate import read_truth

    truth = list(read_truth(world / "truth.parquet", "web").values())
    kept: dict[str, bool] = {}
    for f in sorted(ledger_dir.glob("*.parquet")):
        for row in pq.read_table(f, columns=["key", "web_kept"]).to_pylist():
            kept[row["key"]] = bool(row["web_kept"])
    report = filter_report(truth, kept, split="web")
    return {**report.to_dict(), "markdown": report.to_markdown()}


def run_demo(cfg: DemoConfig, step: Step | None = None) -> DemoResult:
    """Everything `make demo` does; see the module docstring."""
    from .clean import CleanConfig, clean

    announce = step or (lambda message: log.info("%s", message))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    announce(f"world: the built-in web world in {out / 'world'}")
    world = build_world(cfg)
    seconds["world"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    if cfg.train:
        checkpoints, reused = train_checkpoints(cfg, world, announce)
        source = "cache" if reused else "trained"
    else:
        root = Path(cfg.shipped) if cfg.shipped else shipped_root()
        checkpoints = shipped_checkpoints(root)
        source = "shipped"
        announce(
            f"checkpoints: the shipped small captioner and filter in {root} (this project's own "
            "bootstrap; `capfilt demo --train` trains the demo's own)"
        )
    seconds["checkpoints"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    url, started = start_ray(cfg.dashboard)
    if url:
        announce(f"Ray dashboard: {url} (the clean job's stages are listed under Jobs and Data)")
    seconds["ray_start"] = round(time.perf_counter() - t0, 1)

    job_dir = out / "clean"
    if job_dir.exists():  # the demo cleans afresh each time, to show the job's own speed
        if not (job_dir / "job.json").is_file() and any(job_dir.iterdir()):
            raise CapfiltError(f"{job_dir} exists and is not a clean job's output; move it away")
        shutil.rmtree(job_dir)
    t0 = time.perf_counter()
    announce(f"clean: captioning and filtering {cfg.web} web pairs into {job_dir}")
    try:
        summary = clean(
            CleanConfig(
                inputs=[str(world / "web")],
                output=str(job_dir),
                captioner=str(checkpoints["captioner"]),
                filter=str(checkpoints["filter"]),
                human=[str(world / "human")],
                threshold=cfg.threshold,
                batch_size=cfg.batch_size,
                seed=cfg.recipe.seed,
            ),
            _clean_bar(),
        )
    finally:
        if started:
            import ray

            ray.shutdown()
    seconds["clean"] = round(time.perf_counter() - t0, 1)
    quality = filter_quality(world, job_dir / "ledger")
    return DemoResult(
        world=world,
        checkpoints={k: checkpoints[k] for k in ("captioner", "filter")},
        checkpoints_from=source,
        clean=json.loads(json.dumps(dataclasses.asdict(summary), default=str)),  # paths as text
        filter_quality=quality,
        dashboard_url=url,
        stage_seconds=seconds,
    )


def _clean_bar() -> Callable[[int, int, int], None]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("[bold]clean shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[n]} samples"),
        console=Console(stderr=True),  # stdout is the result's (`--json`)
    )
    task = bar.add_task("clean", total=None, n=0)

    def progress(done: int, total: int, samples: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total, n=samples)
        if done >= total:
            bar.stop()

    return progress
