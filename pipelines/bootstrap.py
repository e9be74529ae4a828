"""The bootstrap loop of the paper, on the built-in world:

    pre-train the image encoder on the world's labelled images (BLIP's ImageNet init; `train vit`)
    pre-train a MED on web (+ human) pairs, its image encoder from that init
      -> fine-tune a captioner (LM) and a filter (ITC+ITM) from it, separately, on human pairs
      -> CapFilt the web split (the cleaning job's Captioner, Filter and decision rule)
      -> pre-train a new MED on D' = kept web + kept synthetic + human (the same image encoder init)
      -> evaluate: fine-tune the new MED's filter and captioner on human pairs, then retrieval
         (ITC ranking, ITM re-ranking) and captioning on the test split.

Every stage writes into its own folder of the run directory and is skipped when that folder
already holds its result, so a rerun of the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.curate import Curated, curate
from capfilt.data import Sample, iter_samples
from capfilt.decision import Rule, Scored, decide
from capfilt.errors import CapfiltError, changed_arguments
from capfilt.images import ImageError, open_image
from capfilt.inference import BLIP_TOP_K, Captioner, Filter, capfilt_sampling
from capfilt.ledger import MAX_SEED
from capfilt.model.config import STEMS
from capfilt.model.generate import MAX_CAPTIONS
from capfilt.world.writer import Sample as ShardSample
from capfilt.world.writer import write_shard

from .clean_output import finite_json
from .evaluate import eval_caption, eval_retrieval, read_truth
from .train import train
from .train_config import TrainConfig
from .train_state import list_states, make_run_dir, read_args

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)

# Which texts of the web split enter D' in each row of the paper's ablation (BLIP Table 1),
# plus BLIP-2's variant. Human pairs always do.
VARIANTS = ("none", "filter", "captioner", "capfilt", "blip2")


@dataclass
class BootstrapConfig:
    data: str  # a world directory (`capfilt data synth`): human/, web/, test/, truth.parquet
    out: str  # run directory
    size: str = "small"
    seed: int = 0
    pretrain_epochs: int = 10
    finetune_epochs: int = 5
    batch_size: int = 32
    workers: int = 0  # Ray Train workers for every training stage; 0 trains in this process
    num_captions: int = 1  # K nucleus samples per web image (BLIP: 1; BLIP-2: 10)
    top_p: float = 0.9
    top_k: int = BLIP_TOP_K  # BLIP's sampling: transformers' default top-k before the top-p
    threshold: float = 0.5
    variant: str = "capfilt"  # which D' to build: one of VARIANTS
    curate_batch: int = 64
    eval_k: int = 16  # BLIP's top-k for ITM re-ranking (256 on COCO; our test split is small)
    max_steps: int | None = None  # cap every training stage (tests)
    # The image encoder's supervised init on the world's labelled/ split; 0 steps: none (from scratch).
    # The conv stem and a constant rate are what carried shape into the MED (docs/results.md).
    vit_steps: int = 2000
    vit_stem: str = "conv"
    use_gpu: bool = False  # train, caption, score and evaluate on CUDA devices

    @property
    def device(self) -> str:
        """Where CapFilt and evaluation run: this process's GPU when asked for and present (with
        --workers N the training runs on the workers' GPUs, wherever Ray places them)."""
        import torch

        return "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"

    def validate(self) -> None:
        root = Path(self.data)
        for part in ("human", "web", "test"):
            if not (root / part).is_dir():
                raise CapfiltError(
                    f"{root} has no {part}/ folder: pass a world made by `capfilt data synth --out DIR`"
                )
        if self.vit_steps and not (root / "labelled").is_dir():
            raise CapfiltError(
                f"{root} has no labelled/ folder for the image encoder's init: make the world with "
                "`capfilt data synth` (its default writes one; --labelled N), or pass --vit-steps 0 to "
                "pre-train the image encoder from scratch"
            )
        if self.variant not in VARIANTS:
            raise CapfiltError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if not 1 <= self.num_captions <= MAX_CAPTIONS:
            raise CapfiltError(
                f"--num-captions must be between 1 and {MAX_CAPTIONS}, got {self.num_captions}"
            )
        # Checked here, not at the stage that uses them: a bad value must not cost hours of training.
        for name, value, least in (
            ("pretrain_epochs", self.pretrain_epochs, 1),
            ("finetune_epochs", self.finetune_epochs, 1),
            ("batch_size", self.batch_size, 2),  # ITC and ITM need negatives within the batch
            ("curate_batch", self.curate_batch, 1),
            ("eval_k", self.eval_k, 1),
            ("vit_steps", self.vit_steps, 0),
            ("workers", self.workers, 0),
            ("top_k", self.top_k, 0),
        ):
            if value < least:
                raise CapfiltError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise CapfiltError(f"--max-steps must be at least 1, got {self.max_steps}")
        check_seed(self.seed)
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise CapfiltError(f"--threshold is an ITM probability in [0, 1], got {self.threshold}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise CapfiltError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.vit_steps and self.vit_stem not in STEMS:
            raise CapfiltError(f"unknown --vit-stem {self.vit_stem!r}; choose one of {', '.join(STEMS)}")
        if self.use_gpu and self.device == "cpu":
            if not self.workers:
                raise CapfiltError(
                    "--gpu asked for, but torch sees no CUDA device here: leave --gpu out, or train "
                    "on Ray workers with GPUs (--workers N)"
                )
            log.warning(
                "no CUDA device in this process: training runs on the Ray workers' GPUs, the image "
                "encoder's pre-training, CapFilt and evaluation on this process's CPU"
            )


def check_seed(seed: int) -> None:
    """A seed the sampling and the ledger take (non-negative, int64), checked before any training."""
    if not (0 <= seed <= MAX_SEED):
        raise CapfiltError(f"--seed must be in [0, 2**63 - 1], got {seed}")


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %s: %.1f s", name, self.seconds[name])
        return result


def _train(
    cfg: BootstrapConfig,
    task: str,
    data: list[str],
    out: Path,
    init: Path | None,
    epochs: int,
    steps: int | None = None,
    vit_init: Path | None = None,
) -> Path:
    if (out / "config.json").is_file():
        return out  # finished earlier: the final checkpoint is written last (its states stay beside it)
    workers = cfg.workers
    states = list_states(out)
    if states:  # stopped midway: its data order was cut for the workers it started with
        saved = read_args(states[-1]).get("workers", max(1, workers))  # a world size: 0 and 1 train alike
        if saved != max(1, workers):
            log.warning(
                "%s resumes with the %d workers it started with (--workers %d applies to later stages)",
                out,
                saved,
                workers,
            )
            workers = saved
    tc = TrainConfig(
        task=task,
        data=data,
        out=str(out),
        size=cfg.size,
        init=str(init) if init else None,
        vit_init=str(vit_init) if vit_init else None,
        epochs=epochs,
        steps=steps,
        batch_size=cfg.batch_size,
        workers=workers,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
        use_gpu=cfg.use_gpu,
    )
    return train(tc).checkpoint


def _train_vit(cfg: BootstrapConfig, out: Path) -> Path | None:
    """The image encoder's init (pipelines/train_vit.py), once per run; None with vit_steps 0."""
    if not cfg.vit_steps:
        return None
    if (out / "vit.json").is_file():
        return out  # finished earlier (vit.json is written last)
    from .train_vit import VitTrainConfig, train_vit

    steps = min(cfg.vit_steps, cfg.max_steps) if cfg.max_steps else cfg.vit_steps
    vc = VitTrainConfig(
        data=[str(Path(cfg.data) / "labelled")],
        out=str(out),
        size=cfg.size,
        stem=cfg.vit_stem,
        steps=steps,
        seed=cfg.seed,
        use_gpu=cfg.device == "cuda",  # in this process: its CPU where only the Ray workers have GPUs
    )
    return train_vit(vc).out


def variant_rule(variant: str, threshold: float) -> Rule:
    """The decision rule a D' variant applies (capfilt: BLIP's; blip2: top two of web + synthetic)."""
    if variant == "blip2":
        return Rule(threshold=threshold, mode="blip2", blip2_top=2)
    return Rule(threshold=threshold, synthetic_per_image=1)


def capfilt_web(cfg: BootstrapConfig, captioner_ckpt: Path, filter_ckpt: Path, out: Path) -> Path:
    """CapFilt the web split once: every web text and synthetic candidate scored, BLIP's decision
    recorded. Writes `out/decisions.jsonl` (one row per web sample) and returns its path; D' for
    any variant is built from it by `build_dprime`."""
    done = out / "decisions.jsonl"
    if done.is_file():
        return done
    out.mkdir(parents=True, exist_ok=True)
    gen = capfilt_sampling(num_captions=cfg.num_captions, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed)
    captioner = Captioner(captioner_ckpt, device=cfg.device)
    filt = Filter(filter_ckpt, device=cfg.device)
    rule = variant_rule("capfilt", cfg.threshold)
    rows: list[dict[str, Any]] = []
    batch: list[Sample] = []

    def flush() -> None:
        decoded = []
        for s in batch:
            try:
                decoded.append((s, open_image(s.image, name=s.key)))
            except ImageError as err:
                rows.append(
                    {
                        "key": s.key,
                        "status": err.reason,
                        "reason": err.reason,
                        "web_text": s.text,
                        "web_itm": None,
                        "web_kept": False,
                        "synthetic": [],
                        "synthetic_kept": [],
                    }
                )
        if decoded:
            curated = curate(
                captioner,
                filt,
                [img for _, img in decoded],
                [s.key for s, _ in decoded],
                [s.text for s, _ in decoded],
                rule,
                gen,
                seed=cfg.seed,
            )
            rows.extend(_row(c) for c in curated)
        batch.clear()

    for sample in iter_samples(Path(cfg.data) / "web"):
        batch.append(sample)
        if len(batch) == cfg.curate_batch:
            flush()
    if batch:
        flush()
    tmp = done.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(done)  # last: its presence means this stage finished
    return done


def _row(c: Curated) -> dict[str, Any]:
    return {
        "key": c.key,
        "status": "ok",
        "reason": c.decision.reason,
        "web_text": c.web_text,
        "web_itm": c.web_itm,
        "web_kept": c.decision.web_kept,
        "synthetic": [dataclasses.asdict(s) for s in c.synthetic],
        "synthetic_kept": [s.text for s in c.decision.synthetic_kept],
    }


def variant_texts(row: dict[str, Any], variant: str, threshold: float) -> list[tuple[str, str]]:
    """(origin, text) pairs one web sample contributes to D' in `variant` (the paper's rows)."""
    web = row["web_text"]
    if row["status"] != "ok":
        return []
    if variant == "none":
        return [("web", web)]
    candidates = [Scored(c["text"], c["itm"]) for c in row["synthetic"]]
    if variant == "captioner":  # one synthetic caption, nothing filtered: the first sample drawn
        # (not the best by ITM: with K > 1 that let the filter choose the captioner-only row's caption)
        return [("web", web), ("synthetic", candidates[0].text)] if candidates else [("web", web)]
    web_scored = Scored(web, row["web_itm"]) if row["web_itm"] is not None else None
    if variant == "filter":  # the web text judged, no synthetic captions
        return [("web", web)] if decide(web_scored, [], variant_rule("filter", threshold)).web_kept else []
    decision = decide(web_scored, candidates, variant_rule(variant, threshold))
    return [(origin, text) for origin, text, _ in decision.kept_texts]


def dprime_counts(cfg: BootstrapConfig, variant: str, decisions: Path) -> dict[str, int]:
    """Texts of each origin the web part of D' for `variant` holds, without writing it."""
    counts = {"web": 0, "synthetic": 0}
    for line in decisions.read_text().splitlines():
        for origin, _ in variant_texts(json.loads(line), variant, cfg.threshold):
            counts[origin] += 1
    return counts


def build_dprime(cfg: BootstrapConfig, variant: str, decisions: Path, out: Path) -> dict[str, int]:
    """Write the web part of D' for `variant` as shards in `out` (original image bytes; keys
    `{web key}_{j}`); human pairs are added at training time. Returns counts by origin."""
    counts_path = out / "counts.json"
    if counts_path.is_file():
        return json.loads(counts_path.read_text())
    rows = {r["key"]: r for r in map(json.loads, decisions.read_text().splitlines())}
    samples: list[ShardSample] = []
    for sample in iter_samples(Path(cfg.data) / "web"):
        row = rows.get(sample.key)
        if row is None:
            raise CapfiltError(
                f"{decisions} has no decision for web key {sample.key}: was the world rebuilt?"
            )
        for j, (origin, text) in enumerate(variant_texts(row, variant, cfg.threshold)):
            samples.append(
                ShardSample(
                    key=f"{sample.key}_{j}",
                    jpg=sample.image,
                    text=text,
                    url=str(sample.meta.get("url", "")),
                    width=int(sample.meta.get("width") or 0),
                    height=int(sample.meta.get("height") or 0),
                    extra={"origin": origin, "source_key": sample.key},
                )
            )
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, max(len(samples), 1), 1000):  # an empty D' is still a (one empty shard) dataset
        write_shard(out, i // 1000, samples[i : i + 1000])
    counts = {
        "web": sum(s.extra["origin"] == "web" for s in samples),
        "synthetic": sum(s.extra["origin"] == "synthetic" for s in samples),
    }
    counts_path.write_text(json.dumps(counts, indent=2))
    return counts


def evaluate(cfg: BootstrapConfig, filter_ckpt: Path, captioner_ckpt: Path) -> dict[str, Any]:
    """Retrieval (TR/IR R@1/5/10 with ITM re-ranking) and captioning (BLEU-4, CIDEr-D with beam
    search; attribute accuracy of beam and of nucleus captions) on the test split."""
    test, truth = Path(cfg.data) / "test", _truth_path(cfg)
    retrieval = eval_retrieval(filter_ckpt, test, k=cfg.eval_k, device=cfg.device)
    captions = eval_caption(captioner_ckpt, test, truth, "beam", device=cfg.device)
    if truth is not None:
        nucleus = eval_caption(captioner_ckpt, test, truth, "nucleus", seed=cfg.seed, device=cfg.device)
        captions["attribute_accuracy_nucleus"] = nucleus["attribute_accuracy"]
    return {"retrieval": retrieval, "captioning": captions}


def _truth_path(cfg: BootstrapConfig) -> Path | None:
    path = Path(cfg.data) / "truth.parquet"
    return path if path.is_file() else None


def filter_quality(cfg: BootstrapConfig, decisions: Path) -> dict[str, Any] | None:
    """Precision / recall of the filter's web-text rejections against the world's truth."""
    from capfilt.evaluation import filter_report

    path = _truth_path(cfg)
    if path is None:
        return None
    truth = list(read_truth(path, "web").values())
    kept = {}
    for line in decisions.read_text().splitlines():
        row = json.loads(line)
        kept[row["key"]] = bool(row["web_kept"])
    report = filter_report(truth, kept, split="web")
    return {**report.to_dict(), "markdown": report.to_markdown()}


def _steps_trained(run: Path) -> int:
    """Steps the training run in `run` took (the last metrics line)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return int(json.loads(lines[-1])["step"]) if lines else 0


def first_generation(
    cfg: BootstrapConfig,
    times: StageTimes,
    progress: Progress | None = None,
    vit_out: Path | None = None,
) -> dict[str, Path]:
    """Pre-train on web + human, fine-tune captioner and filter from it, CapFilt the web split.
    The image encoder's init is trained in `vit_out` (default `out/vit`), or read from it when
    finished there earlier."""
    root, out = Path(cfg.data), Path(cfg.out)
    web, human = str(root / "web"), str(root / "human")
    names = ["vit", "pretrain", "captioner", "filter", "capfilt"]

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        if progress:
            progress(name, names.index(name), len(names) + 3)
        return times.run(name, fn)

    vit = stage("vit", lambda: _train_vit(cfg, vit_out or out / "vit"))
    pre = stage(
        "pretrain",
        lambda: _train(
            cfg, "pretrain", [web, human], out / "pretrain", None, cfg.pretrain_epochs, vit_init=vit
        ),
    )
    cap = stage(
        "captioner", lambda: _train(cfg, "captioner", [human], out / "captioner", pre, cfg.finetune_epochs)
    )
    fil = stage("filter", lambda: _train(cfg, "filter", [human], out / "filter", pre, cfg.finetune_epochs))
    decisions = stage("capfilt", lambda: capfilt_web(cfg, cap, fil, out / "curation"))
    return {"vit": vit, "pretrain": pre, "captioner": cap, "filter": fil, "decisions": decisions}


def second_generation(
    cfg: BootstrapConfig,
    variant: str,
    decisions: Path,
    times: StageTimes,
    steps: int | None = None,
    vit: Path | None = None,
    first: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Build D' for `variant`, pre-train a new MED on it (plus human pairs), fine-tune its filter and
    captioner on human pairs, and evaluate them. `steps` fixes the pre-training budget; `vit` is the
    image encoder's init (the first generation's: BLIP starts both models from the same ImageNet ViT).

    With `first` (the first generation's checkpoints, pre-trained for `steps` on web + human pairs),
    the no-bootstrap row is that generation: its D' is the whole web split plus the human pairs and
    its budget is the same, so training it again would only repeat the same run."""
    root, out = Path(cfg.data), Path(cfg.out) / f"variant_{variant}"
    human = str(root / "human")
    saved = out / "results.json"
    if saved.is_file():  # evaluated earlier: its checkpoints are final, so are its figures
        return json.loads(saved.read_text())
    if variant == "none" and first is not None:
        counts = dprime_counts(cfg, "none", decisions)
        results = {
            "dprime": counts,
            "checkpoints": "first generation",
            **times.run("none/evaluate", lambda: evaluate(cfg, first["filter"], first["captioner"])),
        }
        _save_json(saved, results)
        return results
    counts = times.run(f"{variant}/dprime", lambda: build_dprime(cfg, variant, decisions, out / "dprime"))
    new = times.run(
        f"{variant}/pretrain",
        lambda: _train(
            cfg,
            "pretrain",
            [str(out / "dprime"), human],
            out / "pretrain",
            None,
            cfg.pretrain_epochs,
            steps,
            vit_init=vit,
        ),
    )
    fil = times.run(
        f"{variant}/filter", lambda: _train(cfg, "filter", [human], out / "filter", new, cfg.finetune_epochs)
    )
    cap = times.run(
        f"{variant}/captioner",
        lambda: _train(cfg, "captioner", [human], out / "captioner", new, cfg.finetune_epochs),
    )
    results = {"dprime": counts, **times.run(f"{variant}/evaluate", lambda: evaluate(cfg, fil, cap))}
    _save_json(saved, results)
    return results


def _save_json(path: Path, value: Any) -> None:
    """Write `value` to `path` whole or not at all (last: a row that has it is finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


ARGUMENTS = "arguments.json"  # what decides a run's results: a rerun continues only with the same
FREE_ARGUMENTS = ("out", "workers", "use_gpu")  # where and on what it runs: free to change


def _same_arguments(out: Path, cfg: BootstrapConfig, also_free: tuple[str, ...] = ()) -> None:
    """Create `out`, or continue in it only with the arguments it was started with: every stage
    is skipped when its results exist, so other arguments would mix two runs' results."""
    make_run_dir(out)
    args = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in (*FREE_ARGUMENTS, *also_free)}
    args["data"] = str(Path(cfg.data).resolve())
    path = out / ARGUMENTS
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError as err:
            raise CapfiltError(f"{path} is damaged ({err}); restore it, or choose another --out") from err
        diff = changed_arguments(saved, args)
        if diff:
            raise CapfiltError(
                f"--out {out} holds a run started with other arguments ({'; '.join(diff)}); rerun with "
                "the saved ones to continue it, or choose another --out"
            )
    elif any(out.iterdir()):
        log.warning("%s holds files but no %s: continuing it with these arguments", out, ARGUMENTS)
    path.write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")


def run_bootstrap(cfg: BootstrapConfig, progress: Progress | None = None) -> dict[str, Any]:
    """The whole loop; writes `out/summary.json` and `out/summary.md` and returns the summary."""
    cfg.validate()
    out = Path(cfg.out)
    _same_arguments(out, cfg)
    times = StageTimes()
    t0 = time.perf_counter()
    first = first_generation(cfg, times, progress)
    if progress:
        progress("second generation", 5, 8)
    second = second_generation(cfg, cfg.variant, first["decisions"], times, vit=first["vit"])
    if progress:
        progress("evaluate", 7, 8)
    baseline = times.run(
        "evaluate_first_generation", lambda: evaluate(cfg, first["filter"], first["captioner"])
    )
    summary = {
        "config": dataclasses.asdict(cfg),
        "dprime": second.pop("dprime"),
        "filter": filter_quality(cfg, first["decisions"]),
        "results": {"bootstrapped": second, "first_generation": baseline},
        "stage_seconds": times.seconds,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def run_ablation(
    cfg: BootstrapConfig,
    seeds: list[int],
    variants: tuple[str, ...] = VARIANTS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The paper's Table 1 rows (plus BLIP-2's variant) over several seeds, each row pre-trained
    for the same number of steps (the budget of the first pre-training on web + human pairs; that
    pre-training is the no-bootstrap row). The image encoder's init is trained once, in
    `out/vit`, and every seed starts from it, as every BLIP model starts from one ImageNet ViT;
    the seeds vary the rest: the MED's init, the data order, the sampling. Writes `out/ablation.json` and `out/ablation.md` after every seed (over the seeds finished so
    far), so a run of hours shows its table as it goes; each row keeps its figures in
    `variant_*/results.json`, so a rerun continues where it stopped."""
    cfg.validate()
    if not seeds:
        raise CapfiltError("the ablation needs at least one seed")
    for seed in seeds:  # each seed trains for hours: a bad one is refused before the first
        check_seed(seed)
    root = Path(cfg.out)
    _same_arguments(root, cfg, also_free=("seed",))
    per_seed: dict[int, dict[str, Any]] = {}
    times = StageTimes()
    result: dict[str, Any] = {}
    for i, seed in enumerate(seeds):
        scfg = dataclasses.replace(cfg, seed=seed, out=str(root / f"seed_{seed}"))
        first = first_generation(scfg, times, vit_out=root / "vit")
        budget = _steps_trained(first["pretrain"])
        rows = {}
        for j, variant in enumerate(variants):
            if progress:
                progress(f"seed {seed}: {variant}", i * len(variants) + j, len(seeds) * len(variants))
            rows[variant] = second_generation(
                scfg, variant, first["decisions"], times, steps=budget, vit=first["vit"], first=first
            )
        per_seed[seed] = {
            "budget_steps": budget,
            "rows": rows,
            "filter": filter_quality(scfg, first["decisions"]),
        }
        result = _write_ablation(root, cfg, seeds, per_seed, variants, times)
    return result


def _write_ablation(
    root: Path,
    cfg: BootstrapConfig,
    seeds: list[int],
    per_seed: dict[int, dict[str, Any]],
    variants: tuple[str, ...],
    times: StageTimes,
) -> dict[str, Any]:
    done = list(per_seed)
    table = ablation_table(per_seed, variants)
    result = {
        "config": dataclasses.asdict(cfg),
        "seeds": done,
        "seeds_asked": seeds,
        "table": table,
        "per_seed": per_seed,
        "stage_seconds": times.seconds,
    }
    for name, text in (
        ("ablation.json", json.dumps(finite_json(result), indent=2, allow_nan=False) + "\n"),
        ("ablation.md", ablation_markdown(table, done, seeds)),
    ):
        tmp = root / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(root / name)
    return result


ABLATION_METRICS = {
    "R@1 (mean TR/IR)": ("retrieval", "r1_mean"),
    "CIDEr-D": ("captioning", "cider_d"),
    "attribute accuracy": ("captioning", "attribute_accuracy"),
}


def ablation_table(
    per_seed: dict[int, dict[str, Any]], variants: tuple[str, ...]
) -> dict[str, dict[str, list[float | None]]]:
    """variant -> metric -> [mean, spread] over seeds (spread: half the max-min range); [None, None]
    for a metric no seed has."""
    table: dict[str, dict[str, list[float | None]]] = {}
    for variant in variants:
        table[variant] = {}
        for name, (group, key) in ABLATION_METRICS.items():
            values = [run["rows"][variant][group].get(key) for run in per_seed.values()]
            values = [float(v) for v in values if v is not None and math.isfinite(v)]
            if not values:  # a metric these runs have not (attribute accuracy without truth.parquet)
                table[variant][name] = [None, None]
                continue
            mean = sum(values) / len(values)
            table[variant][name] = [round(mean, 4), round((max(values) - min(values)) / 2, 4)]
    return table


def ablation_markdown(
    table: dict[str, dict[str, list[float | None]]], seeds: list[int], asked: list[int] | None = None
) -> str:
    names = list(ABLATION_METRICS)
    todo = [s for s in asked or [] if s not in seeds]
    lines = [
        f"Mean ± half-range over seeds {seeds}"
        + (f" (seeds {todo} not finished yet: rerun the same command to continue)." if todo else "."),
        "",
        "| D' | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for variant, metrics in table.items():
        cells = [
            "n/a" if metrics[n][0] is None else f"{metrics[n][0]:.3f} ± {metrics[n][1]:.3f}" for n in names
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict[str, Any]) -> str:
    """A readable table of a bootstrap run."""
    lines = [
        "# Bootstrap run",
        "",
        "| model | TR@1 | IR@1 | R@1 mean | BLEU-4 | CIDEr-D | attr. acc. (beam) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in summary["results"].items():
        r, c = res["retrieval"], res["captioning"]
        lines.append(
            f"| {name} | {r['tr_r1']:.1f} | {r['ir_r1']:.1f} | {r['r1_mean']:.1f} | {c['bleu4']:.3f} | "
            f"{c['cider_d']:.3f} | {c.get('attribute_accuracy', float('nan')):.3f} |"
        )
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["stage_seconds"].items()]
    lines += ["", f"wall time: {summary['wall_seconds']} s", ""]
    lines += [
        f"D' from the web split: {summary['dprime']['web']} web pairs, {summary['dprime']['synthetic']} synthetic.",
        "",
    ]
    if summary.get("filter"):
        lines += ["## Filter against the truth", "", summary["filter"]["markdown"], ""]
    return "\n".join(lines)
