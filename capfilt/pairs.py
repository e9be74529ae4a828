"""The training set in memory: `PairDataset` loads a (small) dataset of img2dataset shards and
expands it into (image, caption) pairs; `Collator` tokenises a batch. Apart from `capfilt.data`
because it needs torch, which the cleaning job's readers and writers do without."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .data import MAX_WORDS, PathsLike, iter_samples, sample_captions
from .errors import CapfiltError
from .images import ImageError, open_image
from .text import pre_caption

if TYPE_CHECKING:
    from capfilt.model.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


class PairDataset(torch.utils.data.Dataset):
    """(image, caption) pairs held in memory; several captions may share one image.

    Every image is decoded and resized once when the dataset is built (bicubic, as
    `capfilt.images.preprocess`) and kept as uint8; `__getitem__` normalises it. No random
    augmentation: captions mention left and right, so a horizontal flip would make them lie.
    Items are (pixels (3, S, S) float32, text, image_id) where image_id indexes the images.
    """

    def __init__(
        self,
        paths: PathsLike,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        all_captions: bool = True,
        prompt: str = "",
        max_words: int = MAX_WORDS,
    ) -> None:
        """all_captions: use every phrasing in a sample's json "captions" (human-annotated data),
        else only its text; prompt: prepended to every cleaned caption (captioner fine-tuning)."""
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.keys: list[str] = []
        images: list[np.ndarray] = []
        self.texts: list[str] = []
        self.image_ids: list[int] = []
        undecodable = 0
        for sample in iter_samples(paths):
            try:
                img = open_image(sample.image, name=f"{sample.shard}:{sample.key}")
            except ImageError:
                undecodable += 1
                continue
            image_id = len(images)
            resized = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
            images.append(np.asarray(resized, dtype=np.uint8))
            self.keys.append(sample.key)
            for caption in sample_captions(sample, all_captions):
                self.texts.append(prompt + pre_caption(caption, max_words))
                self.image_ids.append(image_id)
        if undecodable:
            log.warning("skipped %d undecodable images in %s", undecodable, paths)
        if not images:
            raise CapfiltError(f"no usable image-text pairs in {paths}")
        self.pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (N_images, 3, S, S) uint8
        log.info("loaded %d pairs over %d images from %s", len(self.texts), len(images), paths)

    @property
    def num_images(self) -> int:
        return self.pixels.shape[0]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        image_id = self.image_ids[index]
        x = self.pixels[image_id].float() / 255.0  # (3, S, S)
        return (x - self.mean) / self.std, self.texts[index], image_id


class Collator:
    """Batches PairDataset items: pixels (B, 3, S, S), input_ids and attention_mask (B, T),
    image_ids (B,). `[CLS] text [SEP]` padded to the longest, cut at `max_length` tokens."""

    def __init__(self, tokenizer: CaptionTokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: Sequence[tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor]:
        pixels, texts, image_ids = zip(*batch)
        input_ids, attention_mask = self.tokenizer(list(texts), max_length=self.max_length)
        return {
            "pixels": torch.stack(pixels),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_ids": torch.tensor(image_ids, dtype=torch.long),
        }
