"""Captioner and Filter: batched inference over a checkpoint.

These two classes are what every front end hosts: the CLI, the cleaning job's Ray actors and
the REST service. Each loads its checkpoint once; inputs are PIL images (decoded by the caller,
so a bad file is the caller's row-level error, not a crash here).

- `Captioner.caption`: K captions per image from the image-grounded decoder (`[DEC]`), the
  prompt "a picture of " stripped.
- `Filter.score`: for each image, ITM p(match) from the image-grounded encoder (`[ENC]`) and the
  ITC cosine for every text given with it; each image is encoded once for all its texts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from capfilt.model.checkpoint import Checkpoint, load_checkpoint
from capfilt.model.generate import GenerationConfig, generate

from .images import preprocess
from .text import pre_caption

log = logging.getLogger(__name__)

# BLIP's CapFilt sampling settings (blip.py `generate(sample=True)`): top-p 0.9, repetition penalty 1.1.
CAPFILT_SAMPLING = GenerationConfig(
    method="nucleus", top_p=0.9, repetition_penalty=1.1, max_tokens=30, min_tokens=5, num_captions=1
)


def _resolve(checkpoint: Checkpoint | str | Path, device: str | torch.device) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return load_checkpoint(checkpoint, device=device)


class _Hosted:
    """A checkpoint held for inference, with its preprocessing."""

    task = ""

    def __init__(
        self, checkpoint: Checkpoint | str | Path, *, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.ckpt = _resolve(checkpoint, device)
        self.ckpt.require(self.task, checkpoint if not isinstance(checkpoint, Checkpoint) else "")
        self.med = self.ckpt.med.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @property
    def digest(self) -> str:
        return self.ckpt.digest

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        cfg = self.ckpt.config
        return preprocess(images, cfg.vision.image_size, cfg.image_mean, cfg.image_std).to(self.device)


class Captioner(_Hosted):
    task = "caption"

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        generation: GenerationConfig | None = None,
    ) -> None:
        super().__init__(checkpoint, device=device, batch_size=batch_size)
        self.generation = generation or CAPFILT_SAMPLING
        self.generation.validate()
        self.prompt_ids = self.ckpt.tokenizer.prompt_ids(self.ckpt.config.prompt).to(self.device)

    @torch.inference_mode()
    def caption(
        self,
        images: Sequence[Image.Image],
        generation: GenerationConfig | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]:
        """K captions for each image. `seeds` (one per image) make nucleus sampling reproducible
        per image, whatever batch the image lands in; default: `generation.seed + index`."""
        gen = generation or self.generation
        gen.validate()
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
        all_seeds = list(seeds) if seeds is not None else [gen.seed + i for i in range(len(images))]
        out: list[list[str]] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            embeds = self.med.encode_image(self.pixels(batch))
            tokens = generate(self.med, embeds, self.prompt_ids, gen, all_seeds[start : start + len(batch)])
            out.extend([self.ckpt.tokenizer.decode(t) for t in per_image] for per_image in tokens)
        return out


@dataclass(frozen=True)
class TextScore:
    text: str
    itm: float  # softmax(ITM logits)[match], computed with [ENC]
    itc: float  # cosine of the 256-d ITC projections


class Filter(_Hosted):
    task = "score"

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        clean_text: bool = True,
    ) -> None:
        super().__init__(checkpoint, device=device, batch_size=batch_size)
        self.clean_text = clean_text  # BLIP's pre_caption, as its training texts were

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        """Scores of `texts[i]` (any number, possibly none) against `images[i]`."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(texts)} text lists for {len(images)} images")
        out: list[list[TextScore]] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(
                self._score_batch(
                    images[start : start + self.batch_size], texts[start : start + self.batch_size]
                )
            )
        return out

    def _score_batch(
        self, images: Sequence[Image.Image], texts: Sequence[Sequence[str]]
    ) -> list[list[TextScore]]:
        med, tok = self.med, self.ckpt.tokenizer
        embeds = med.encode_image(self.pixels(images))  # (B, 1+N, Dv): once per image
        image_feat = med.image_feature(embeds)  # (B, E)
        owner = [i for i, ts in enumerate(texts) for _ in ts]
        flat = [t for ts in texts for t in ts]
        results: list[list[TextScore]] = [[] for _ in images]
        if not flat:
            return results
        cleaned = [pre_caption(t) if self.clean_text else t for t in flat]
        itm, itc = [], []
        for start in range(0, len(flat), self.batch_size):  # texts in chunks: bounded memory
            rows = torch.tensor(owner[start : start + self.batch_size], device=self.device)
            ids, mask = tok(cleaned[start : start + self.batch_size], self.ckpt.config.max_text_tokens)
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = med.itm_logits(embeds.index_select(0, rows), ids, mask)
            itm.append(logits.float().softmax(-1)[:, 1])
            itc.append((image_feat.index_select(0, rows) * med.text_feature(ids, mask)).sum(-1).float())
        p_match, cosine = torch.cat(itm).tolist(), torch.cat(itc).tolist()
        for i, text, p, c in zip(owner, flat, p_match, cosine):
            results[i].append(TextScore(text, p, c))
        return results
