"""The bootstrap loop of the paper, on the built-in world:

    pre-train a MED on web (+ human) pairs
      -> fine-tune a captioner (LM) and a filter (ITC+ITM) from it, separately, on human pairs
      -> CapFilt the web split (the cleaning job's Captioner, Filter and decision rule)
      -> pre-train a new MED on D' = kept web + kept synthetic + human
      -> evaluate: fine-tune the new MED's filter and captioner on human pairs, then retrieval
         (ITC ranking, ITM re-ranking) and captioning on the test split.

Every stage writes into its own folder of the run directory and is skipped when that folder
already holds its result, so a rerun of the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.curate import Curated, curate
from capfilt.data import Sample, iter_samples
from capfilt.decision import Rule
from capfilt.errors import CapfiltError
from capfilt.images import ImageError, open_image
from capfilt.inference import Captioner, Filter
from capfilt.model.generate import GenerationConfig
from capfilt.world.writer import Sample as ShardSample
from capfilt.world.writer import write_shard

from .evaluate import eval_caption, eval_retrieval, read_truth
from .train import train
from .train_config import TrainConfig

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
    threshold: float = 0.5
    variant: str = "capfilt"  # which D' to build: one of VARIANTS
    curate_batch: int = 64
    eval_k: int = 16  # BLIP's top-k for ITM re-ranking (256 on COCO; our test split is small)
    max_steps: int | None = None  # cap every training stage (tests)

    def validate(self) -> None:
        root = Path(self.data)
        for part in ("human", "web", "test"):
            if not (root / part).is_dir():
                raise CapfiltError(
                    f"{root} has no {part}/ folder: pass a world made by `capfilt data synth --out DIR`"
                )
        if self.variant not in VARIANTS:
            raise CapfiltError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.num_captions < 1:
            raise CapfiltError(f"num_captions must be at least 1, got {self.num_captions}")


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
    cfg: BootstrapConfig, task: str, data: list[str], out: Path, init: Path | None, epochs: int
) -> Path:
    if (out / "config.json").is_file() and not (out / "train_state").exists():
        return out  # finished earlier (a finished run keeps its final checkpoint)
    tc = TrainConfig(
        task=task,
        data=data,
        out=str(out),
        size=cfg.size,
        init=str(init) if init else None,
        epochs=epochs,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
    )
    return train(tc).checkpoint


def _web_samples(cfg: BootstrapConfig) -> Iterator[Sample]:
    yield from iter_samples(Path(cfg.data) / "web")


def _rule(cfg: BootstrapConfig) -> Rule:
    if cfg.variant == "blip2":
        return Rule(threshold=cfg.threshold, mode="blip2", blip2_top=2)
    return Rule(threshold=cfg.threshold, synthetic_per_image=1)


def capfilt_web(cfg: BootstrapConfig, captioner_ckpt: Path, filter_ckpt: Path, out: Path) -> dict[str, Any]:
    """CapFilt the web split; write D' (kept web, kept synthetic, human) as shards in `out` and the
    decisions as `out/decisions.jsonl`. Returns counts."""
    done = out / "decisions.jsonl"
    if done.is_file():
        return json.loads((out / "counts.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    gen = GenerationConfig(
        method="nucleus",
        num_captions=cfg.num_captions,
        top_p=cfg.top_p,
        repetition_penalty=1.1,
        max_tokens=30,
        min_tokens=5,
        seed=cfg.seed,
    )
    captioner, filt = Captioner(captioner_ckpt), Filter(filter_ckpt)
    rule = _rule(cfg)
    rows: list[dict[str, Any]] = []
    dprime: list[ShardSample] = []
    batch: list[Sample] = []

    def flush() -> None:
        decoded = []
        for s in batch:
            try:
                decoded.append((s, open_image(s.image, name=s.key)))
            except ImageError as err:
                rows.append({"key": s.key, "status": err.reason, "web_kept": False, "synthetic_kept": []})
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
            for (sample, _), c in zip(decoded, curated):
                rows.append(_row(c))
                dprime.extend(_dprime_samples(sample, c, cfg.variant))
        batch.clear()

    for sample in _web_samples(cfg):
        batch.append(sample)
        if len(batch) == cfg.curate_batch:
            flush()
    if batch:
        flush()
    for i in range(0, max(len(dprime), 1), 1000):  # an empty D' is still a (one empty shard) dataset
        write_shard(out, i // 1000, dprime[i : i + 1000])
    counts = {
        "web_samples": len(rows),
        "web_kept": sum(r["web_kept"] for r in rows),
        "synthetic_kept": sum(len(r["synthetic_kept"]) for r in rows),
        "dprime_web_pairs": len(dprime),
    }
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    tmp = done.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(done)  # last: its presence means this stage finished
    return counts


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


def _dprime_samples(sample: Sample, c: Curated, variant: str) -> list[ShardSample]:
    """The web image's pairs in D' for `variant` (the web text and/or synthetic captions)."""
    if variant == "none":
        texts = [("web", sample.text)]
    elif variant == "filter":
        texts = [("web", sample.text)] if c.decision.web_kept else []
    elif variant == "captioner":
        best = max(c.synthetic, key=lambda s: s.itm)  # one synthetic caption, no filtering
        texts = [("web", sample.text), ("synthetic", best.text)]
    else:  # capfilt, blip2
        texts = [(origin, text) for origin, text, _ in c.decision.kept_texts]
    meta = sample.meta
    out = []
    for j, (origin, text) in enumerate(texts):
        out.append(
            ShardSample(
                key=f"{sample.key}_{j}",
                jpg=sample.image,
                text=text,
                url=str(meta.get("url", "")),
                width=int(meta.get("width") or 0),
                height=int(meta.get("height") or 0),
                extra={"origin": origin, "source_key": sample.key},
            )
        )
    return out


def evaluate(cfg: BootstrapConfig, filter_ckpt: Path, captioner_ckpt: Path) -> dict[str, Any]:
    """Retrieval (TR/IR R@1/5/10 with ITM re-ranking) and captioning (BLEU-4, CIDEr-D with beam
    search; attribute accuracy of beam and of nucleus captions) on the test split."""
    test, truth = Path(cfg.data) / "test", _truth_path(cfg)
    retrieval = eval_retrieval(filter_ckpt, test, k=cfg.eval_k)
    captions = eval_caption(captioner_ckpt, test, truth, "beam")
    if truth is not None:
        nucleus = eval_caption(captioner_ckpt, test, truth, "nucleus", seed=cfg.seed)
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


def run_bootstrap(cfg: BootstrapConfig, progress: Progress | None = None) -> dict[str, Any]:
    """The whole loop; writes `out/summary.json` and `out/summary.md` and returns the summary."""
    cfg.validate()
    root, out = Path(cfg.data), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    times = StageTimes()
    web, human = str(root / "web"), str(root / "human")
    stages = ["pretrain", "captioner", "filter", "capfilt", "pretrain_dprime", "eval_finetune", "evaluate"]

    def stage(i: int, name: str, fn: Callable[[], Any]) -> Any:
        if progress:
            progress(name, i, len(stages))
        return times.run(name, fn)

    t0 = time.perf_counter()
    pre = stage(
        0,
        "pretrain",
        lambda: _train(cfg, "pretrain", [web, human], out / "pretrain", None, cfg.pretrain_epochs),
    )
    cap = stage(
        1, "captioner", lambda: _train(cfg, "captioner", [human], out / "captioner", pre, cfg.finetune_epochs)
    )
    fil = stage(2, "filter", lambda: _train(cfg, "filter", [human], out / "filter", pre, cfg.finetune_epochs))
    dprime = out / f"dprime_{cfg.variant}"
    counts = stage(3, "capfilt", lambda: capfilt_web(cfg, cap, fil, dprime))
    new = stage(
        4,
        "pretrain_dprime",
        lambda: _train(
            cfg, "pretrain", [str(dprime), human], out / "pretrain_dprime", None, cfg.pretrain_epochs
        ),
    )
    new_fil = stage(
        5,
        "eval_finetune",
        lambda: (
            _train(cfg, "filter", [human], out / "eval_filter", new, cfg.finetune_epochs),
            _train(cfg, "captioner", [human], out / "eval_captioner", new, cfg.finetune_epochs),
        ),
    )
    results = stage(
        6,
        "evaluate",
        lambda: {
            "bootstrapped": evaluate(cfg, new_fil[0], new_fil[1]),
            "first_generation": evaluate(cfg, fil, cap),
        },
    )
    summary = {
        "config": dataclasses.asdict(cfg),
        "counts": counts,
        "filter": filter_quality(cfg, dprime / "decisions.jsonl"),
        "results": results,
        "stage_seconds": times.seconds,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


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
    if summary.get("filter"):
        lines += ["## Filter against the truth", "", summary["filter"]["markdown"], ""]
    return "\n".join(lines)
