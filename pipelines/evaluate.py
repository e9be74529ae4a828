"""Evaluation runs over shards: what `capfilt eval` and the bootstrap loop both call.

- retrieval: a filter checkpoint on a test split (every caption of an image is a query), BLIP's
  protocol (ITC ranking, top-k re-ranked by ITM logit + ITC), TR/IR R@1/5/10;
- caption: a captioner checkpoint on a test split, BLEU-4 and CIDEr-D against the reference
  captions and, given the world's truth, attribute accuracy;
- filter: a filter checkpoint on a web split with the world's truth, precision / recall / F1 of
  web-text rejections by noise type (the web texts only: no captioner involved).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from capfilt.data import iter_samples, sample_captions
from capfilt.decision import Rule, Scored, decide
from capfilt.errors import CapfiltError
from capfilt.images import open_image
from capfilt.inference import CAPFILT_SAMPLING, Captioner, Filter
from capfilt.model.checkpoint import CheckpointError, load_checkpoint
from capfilt.model.generate import GenerationConfig

PathsLike = str | Path | list[str] | list[Path]


def _checkpoint(path: str | Path, task: str, device: str = "cpu"):  # -> Checkpoint
    try:
        ckpt = load_checkpoint(path, device=device)
        ckpt.require(task, path)
    except CheckpointError as err:
        raise CapfiltError(str(err)) from err
    return ckpt


def read_truth(path: str | Path | None, split: str) -> dict[str, dict[str, Any]]:
    """key -> truth row of one split of a world's truth.parquet ({} when `path` is None)."""
    if path is None:
        return {}
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise CapfiltError(
            f"truth table not found: {p} (a world made by `capfilt data synth` has truth.parquet)"
        )
    try:
        rows = pq.read_table(p, columns=None).to_pylist()
        return {r["key"]: r for r in rows if r["split"] == split}
    except (OSError, ValueError, KeyError, TypeError) as err:  # pyarrow's errors are OSError/ValueError
        raise CapfiltError(f"{p} is not a world's truth table (parquet with key, split, ...): {err}") from err


def eval_retrieval(
    filter_ckpt: str | Path, data: PathsLike, k: int = 16, device: str = "cpu"
) -> dict[str, float]:
    """TR/IR recall at 1/5/10 (percent) and their means, after ITM re-ranking of the ITC top-k."""
    from capfilt.evaluation import retrieval_scores

    ckpt = _checkpoint(filter_ckpt, "score", device)
    samples = list(iter_samples(data))
    images = [open_image(s.image, name=s.key) for s in samples]
    texts, owner = [], []
    for i, s in enumerate(samples):
        for caption in sample_captions(s):
            texts.append(caption)
            owner.append(i)
    result = retrieval_scores(ckpt.med, ckpt.tokenizer, images, texts, owner, k=k)
    return {**result.metrics(), "itc_only": result.itc_metrics(), "images": len(images), "texts": len(texts)}


def eval_caption(
    captioner_ckpt: str | Path,
    data: PathsLike,
    truth: str | Path | None = None,
    method: str = "beam",
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """BLEU-4, CIDEr-D (and attribute accuracy with `truth`) of one caption per test image.

    method "beam" is BLIP's captioning evaluation (3 beams); "nucleus" is what CapFilt samples."""
    from capfilt.evaluation import caption_metrics

    if method == "beam":
        gen = GenerationConfig(method="beam", num_beams=3, max_tokens=30, min_tokens=5)
    elif method == "nucleus":
        gen = dataclasses.replace(CAPFILT_SAMPLING, seed=seed)
    else:
        raise CapfiltError(f"unknown caption method {method!r}; use beam or nucleus")
    samples = list(iter_samples(data))
    rows = read_truth(truth, "test")
    if truth is not None:  # before any captioning: another world's truth scores wrong, silently
        for sample in samples:
            _check_against_truth(sample, rows.get(sample.key), data, truth, "test")
    images = [open_image(s.image, name=s.key) for s in samples]
    captioner = Captioner(_checkpoint(captioner_ckpt, "caption", device), device=device)
    captions = [c[0] for c in captioner.caption(images, gen)]
    refs = [sample_captions(s) for s in samples]
    contents = [rows[s.key]["content"] for s in samples] if rows else None
    metrics = caption_metrics(captions, refs, contents)
    return {**metrics, "method": method, "images": len(samples), "examples": captions[:5]}


def eval_filter(
    filter_ckpt: str | Path, data: PathsLike, truth: str | Path, threshold: float = 0.5, batch_size: int = 64
) -> dict[str, Any]:
    """The filter's keep/drop decisions on web texts against the truth (positive class: noisy)."""
    from capfilt.evaluation import filter_report

    truth_rows = read_truth(truth, "web")
    filt = Filter(_checkpoint(filter_ckpt, "score"), batch_size=batch_size)
    rule = Rule(threshold=threshold)
    kept: dict[str, bool] = {}
    batch: list = []

    def flush() -> None:
        images = [open_image(s.image, name=s.key) for s in batch]
        texts = [[s.text] if s.text.strip() else [] for s in batch]
        for s, scores in zip(batch, filt.score(images, texts)):
            web = Scored(s.text, scores[0].itm) if scores else None
            kept[s.key] = decide(web, [], rule).web_kept
        batch.clear()

    for sample in iter_samples(data):
        _check_against_truth(sample, truth_rows.get(sample.key), data, truth)
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    report = filter_report(list(truth_rows.values()), kept, split="web")
    return {**report.to_dict(), "threshold": threshold, "markdown": report.to_markdown()}


def _check_against_truth(
    sample: Any, row: dict[str, Any] | None, data: PathsLike, truth: str | Path, split: str = "web"
) -> None:
    """CapfiltError, before any more is scored, for a sample the truth's `split` does not hold as
    it is: its figures would count another sample's truth (keys repeat across a world's splits,
    and a world of another seed or noise mix has other texts under the same keys)."""
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    where = f"sample {sample.key!r} of {' '.join(map(str, paths))}"
    hint = f"pass a world's {split} shards (WORLD/{split}) with that world's truth.parquet"
    if row is None:
        raise CapfiltError(f"{where} is not in the {split} split of {truth}: {hint}")
    if row.get("text") is not None and row["text"] != sample.text:
        raise CapfiltError(
            f"{where} carries another text than the {split} split of {truth} lists under its key "
            f"({sample.text[:60]!r} against {str(row['text'])[:60]!r}): {hint}"
        )


def dump(result: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "markdown"})
