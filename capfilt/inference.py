"""Captioner and Filter: batched inference over a checkpoint.

These two classes are what every front end hosts: the CLI, the cleaning job's Ray actors and
the REST service. Each loads its checkpoint once; inputs are PIL images or (H, W, 3) uint8 arrays
(decoded by the caller, so a bad file is the caller's row-level error, not a crash here).

- `Captioner.caption`: K captions per image from the image-grounded decoder (`[DEC]`), the
  prompt "a picture of " stripped.
- `Filter.score`: for each image, ITM p(match) from the image-grounded encoder (`[ENC]`) and the
  ITC cosine for every text given with it; each image is encoded once for all its texts.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import logging
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from capfilt.model import packed
from capfilt.model.checkpoint import Checkpoint, load_checkpoint
from capfilt.model.generate import GenerationConfig, generate
from capfilt.model.med import MED

from .images import ImageLike, normalize_pixels, stack_pixels
from .text import pre_caption

log = logging.getLogger(__name__)

# What Captioner and Filter take: RGB PIL images or (H, W, 3) uint8 arrays, or a batch already
# stacked by `_Hosted.stack` ((B, S, S, 3) uint8).
Images = Sequence[ImageLike] | torch.Tensor

# BLIP's CapFilt sampling settings (blip.py `generate(sample=True)`): top-p 0.9, repetition penalty 1.1,
# and top-k 50: BLIP calls transformers' `generate` without top_k, which then applies its default of 50.
BLIP_TOP_K = 50
CAPFILT_SAMPLING = GenerationConfig(
    method="nucleus",
    top_p=0.9,
    top_k=BLIP_TOP_K,
    repetition_penalty=1.1,
    max_tokens=30,
    min_tokens=5,
    num_captions=1,
)


def capfilt_sampling(*, num_captions: int, top_p: float, top_k: int, seed: int) -> GenerationConfig:
    """BLIP's CapFilt sampling with a job's K, top-p, top-k and seed (the CLI, REST and bootstrap)."""
    return dataclasses.replace(
        CAPFILT_SAMPLING, num_captions=num_captions, top_p=top_p, top_k=top_k, seed=seed
    )


def _resolve(checkpoint: Checkpoint | str | Path, device: str | torch.device) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return load_checkpoint(checkpoint, device=device)


PRECISIONS = ("exact", "fast")
# Packed decoding weights paid for BERT-base (768 wide: steps 12% faster) and not for the built-in
# small model (128 wide: within the noise), where the chunking costs what the packing saves.
PACK_MIN_WIDTH = 512
PACKED_WEIGHTS_ENV = "CAPFILT_PACKED_WEIGHTS"  # "0": never pack by default (memory over speed)


# glibc's malloc serves blocks above its mmap threshold (128 KiB at first, raised as such blocks are
# freed) with fresh pages from the system, and gives free memory at the heap's top back above its
# trim threshold. A model's activations, megabytes each and freed every call, can then keep coming
# back as fresh pages, a page fault per 4 KiB: a process settles into that or not. On the Xeon of
# `docs/benchmarks.md`, the filter over 128 small pairs took 1.44-1.73 ms a pair with thousands of
# page faults a call and 1.40-1.43 with these fixed thresholds and almost none, at the same peak RSS.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 64 * 2**20
TUNE_MALLOC_ENV = "CAPFILT_TUNE_MALLOC"  # "0": leave glibc's malloc as the process has it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once; hosted models on a CPU call
    it). False where the C library is not glibc or `TUNE_MALLOC_ENV` is "0"."""
    if os.environ.get(TUNE_MALLOC_ENV, "").strip() == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


FAST_CPU_ENV = "CAPFILT_FAST_CPU"  # fast mode on a CPU: "bf16", "int8", or unset (bf16 where AMX)
FAST_CPU_KINDS = ("bf16", "int8")


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles (Intel Sapphire Rapids and later):
    there a bf16 matmul ran 6.5-7x the fp32 one (2.6-3.0 against 0.40 TFLOP/s on the 2-core Xeon of
    `docs/benchmarks.md`). torch's own probe, else the kernel's CPU flags."""
    probe = getattr(torch._C._cpu, "_init_amx", None)  # enables the tiles for this process (Linux)
    try:
        if probe is not None:
            return bool(probe())
    except RuntimeError:
        return False
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def fast_cpu_kind() -> str:
    """How fast mode runs on this CPU: `FAST_CPU_ENV` when set, else bf16 where AMX is, int8
    elsewhere (without AMX, bf16 matmuls are no faster than fp32 ones)."""
    kind = os.environ.get(FAST_CPU_ENV, "").strip().lower()
    if kind and kind not in FAST_CPU_KINDS:
        raise ValueError(
            f"{FAST_CPU_ENV}={kind!r}: choose one of {', '.join(FAST_CPU_KINDS)} (or leave it unset)"
        )
    return kind or ("bf16" if cpu_has_amx() else "int8")


# On a CPU, fast mode pays for the text side from BERT-base's width: a narrow decoder's steps are
# too small for bf16 or int8 kernels (the built-in small model, 128 wide, all in bf16: 185 pairs/s,
# all in int8: 224, against exact mode's 233-238), so there only the image encoder runs fast (bf16:
# 259-264 pairs/s, int8: 243).
FAST_TEXT_MIN_WIDTH = 512


# AMD architectures whose matrix units take bf16 (ROCm's gcnArchName starts with one of these):
# CDNA (MI100 gfx908, MI200 gfx90a, MI300 gfx94x, MI350 gfx95x) and RDNA 3/4 (gfx11, gfx12). Before
# them (MI50/MI60 gfx906, Vega gfx900, RDNA 1/2 gfx10) bf16 is emulated, and fp16 is the fast type.
AMD_BF16_ARCHS = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether this GPU multiplies bf16 matrices natively: NVIDIA's from Ampere (compute
    capability 8) on, AMD's from CDNA and RDNA 3 on (`AMD_BF16_ARCHS`; an architecture name ROCm
    does not give counts as bf16-capable). Older ones (V100, T4, MI50) only emulate bf16, slowly;
    fast mode runs fp16 there."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip:
        arch = str(getattr(props, "gcnArchName", "") or "").lower()
        return not arch.startswith("gfx") or arch.startswith(AMD_BF16_ARCHS)
    return props.major >= 8


def fast_dtype(device: torch.device) -> torch.dtype:
    """The dtype fast mode's activations (and pixels) take on `device`: bf16 on GPUs that have it
    and on CPUs with AMX, fp16 on older GPUs, else fp32 (int8 weights on such CPUs)."""
    if device.type == "cuda":
        return torch.bfloat16 if gpu_has_bf16(device) else torch.float16
    if fast_cpu_kind() == "bf16":
        return torch.bfloat16
    return torch.float32


def fast_model(med: MED, device: torch.device, inplace: bool = False) -> MED:
    """The MED for fast mode: bf16 weights on a GPU and on a CPU with AMX (fp16 on GPUs older
    than Ampere, `gpu_has_bf16`); elsewhere on a CPU, int8 dynamic quantisation of every Linear
    (weights int8 per output channel, activations quantised per batch; attention stays fp32). `FAST_CPU_ENV` picks for a CPU. On a CPU, a text
    side narrower than FAST_TEXT_MIN_WIDTH stays fp32 and only the image encoder runs fast.
    Per channel rather than per tensor: on random base weights the filter's ITM moved by 0.007 on
    average instead of 0.035, and 48/48 web decisions matched exact mode instead of 42/48, at the
    same speed. Without `inplace`, `med` is left as it was (a caller's checkpoint keeps its fp32
    weights)."""
    med = med if inplace else copy.deepcopy(med)
    whole = device.type == "cuda" or med.config.text.width >= FAST_TEXT_MIN_WIDTH
    target = med if whole else med.visual_encoder  # converted in place
    dtype = fast_dtype(device)
    if dtype != torch.float32:  # bf16, or fp16 on GPUs without bf16
        target.to(dtype)
        return med
    with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        torch.ao.quantization.quantize_dynamic(target, spec, dtype=torch.qint8, inplace=True)
    return med


class _Hosted:
    """A checkpoint held for inference, with its preprocessing.

    precision "exact": fp32, the same outputs as transformers on the same weights; "fast":
    `fast_model` (bf16 on a GPU, fp16 on one before Ampere, bf16 on a CPU with AMX, int8 on other
    CPUs), for throughput at a measured cost in agreement.
    """

    task = ""

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        precision: str = "exact",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.ckpt = _resolve(checkpoint, device)
        self.ckpt.require(self.task, checkpoint if not isinstance(checkpoint, Checkpoint) else "")
        self.device = torch.device(device)
        if self.device.type == "cpu":
            tune_malloc()
        self.med = self.ckpt.med.to(self.device).eval()
        if precision == "fast":  # in place only when the checkpoint is ours (loaded from a path)
            self.med = fast_model(self.med, self.device, inplace=not isinstance(checkpoint, Checkpoint))
        self.precision = precision
        self.dtype = fast_dtype(self.device) if precision == "fast" else torch.float32
        self.batch_size = batch_size

    @property
    def digest(self) -> str:
        return self.ckpt.digest

    @property
    def image_size(self) -> int:
        return self.ckpt.config.vision.image_size

    def stack(self, images: Images) -> torch.Tensor:
        """(B, S, S, 3) uint8 pixels at this model's resolution, ready to travel to its device
        (page-locked when that is a GPU). Callers that run two models on the same images (the
        captioner, then the filter) stack once and hand the result to both."""
        if isinstance(images, torch.Tensor):
            return images
        return stack_pixels(images, self.image_size, pin=self.device.type == "cuda")

    def pixels(self, images: Images) -> torch.Tensor:
        """Normalised (B, 3, S, S) pixels on the model's device, in the model's dtype."""
        pixels = self.stack(images)
        if pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"stacked pixels must be (B, {self.image_size}, {self.image_size}, 3) uint8 for this "
                f"checkpoint, got {tuple(pixels.shape)} {pixels.dtype}"
            )
        cfg = self.ckpt.config
        return normalize_pixels(pixels, cfg.image_mean, cfg.image_std, self.device, self.dtype)


class Captioner(_Hosted):
    task = "caption"

    def __init__(
        self,
        checkpoint: Checkpoint | str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        generation: GenerationConfig | None = None,
        precision: str = "exact",
        pack: bool | None = None,
    ) -> None:
        """`pack`: decode with MKL's pre-packed weights (`capfilt.model.packed`): steps 12% faster
        for BLIP's BERT-base on a CPU, for about 430 MB more. Default: where that was measured to
        pay: a CPU, exact mode, a text width of at least PACK_MIN_WIDTH, and a checkpoint loaded here
        (a Checkpoint object is the caller's and stays as it is); PACKED_WEIGHTS_ENV=0 turns it off."""
        super().__init__(checkpoint, device=device, batch_size=batch_size, precision=precision)
        self.generation = generation or CAPFILT_SAMPLING
        self.generation.validate()
        self.prompt_ids = self.ckpt.tokenizer.prompt_ids(self.ckpt.config.prompt).to(self.device)
        if pack is None:
            pack = (
                os.environ.get(PACKED_WEIGHTS_ENV, "1") != "0"
                and self.device.type == "cpu"
                and precision == "exact"
                and not isinstance(checkpoint, Checkpoint)
                and self.ckpt.config.text.width >= PACK_MIN_WIDTH
                and packed.available()
            )
        if pack:
            if not packed.available() or self.device.type != "cpu" or precision != "exact":
                raise ValueError("pack=True is for exact mode on a CPU with a torch built with MKL (x86)")
            packed.pack_for_decoding(self.med, rows=batch_size * self.generation.num_captions)
        self.packed = bool(pack)

    @torch.inference_mode()
    def caption(
        self,
        images: Images,
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
        precision: str = "exact",
    ) -> None:
        super().__init__(checkpoint, device=device, batch_size=batch_size, precision=precision)
        self.clean_text = clean_text  # BLIP's pre_caption, as its training texts were

    @torch.inference_mode()
    def score(self, images: Images, texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        """Scores of `texts[i]` (any number, possibly none) against `images[i]`.

        Within a batch of images, texts go through the text encoder in chunks of like length, each
        padded only to its own longest text: ITC chunks of texts, ITM chunks of whole images (each
        image's cross-attention keys and values serve all its texts). Web alt-texts run from 2 to
        35+ tokens; on the trained small filter over 256 world pairs (web text and synthetic caption,
        55% of the padded tokens real), batches of 128 scored in 1.13-1.23 ms a pair against 1.27-1.34
        padded to each batch's longest (at batches of 32: no change)."""
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

    def _score_batch(self, images: Images, texts: Sequence[Sequence[str]]) -> list[list[TextScore]]:
        med, tok = self.med, self.ckpt.tokenizer
        embeds = med.encode_image(self.pixels(images))  # (B, 1+N, Dv): once per image
        image_feat = med.image_feature(embeds)  # (B, E)
        owner = [i for i, ts in enumerate(texts) for _ in ts]
        flat = [t for ts in texts for t in ts]
        results: list[list[TextScore]] = [[] for _ in images]
        if not flat:
            return results
        cleaned = [pre_caption(t) if self.clean_text else t for t in flat]
        ids, mask = tok(cleaned, self.ckpt.config.max_text_tokens)  # padded to the longest of all
        lengths = mask.sum(dim=1)  # tokens of each text
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows_of = torch.tensor(owner, device=self.device)  # each text's image
        itm = torch.empty(len(flat), device=self.device)
        itc = torch.empty(len(flat), device=self.device)
        # ITC: each text alone, in chunks of texts of like length, each cut to its longest text.
        for chunk in _length_chunks(lengths, [1] * len(flat), self.batch_size):
            rows = chunk.to(self.device)
            feats = med.text_feature(*_trimmed(ids, mask, rows))
            itc[rows] = (image_feat.index_select(0, rows_of[rows]) * feats).sum(-1).float()
        # ITM: whole images (each image's cross-attention keys and values projected once for all
        # its texts), in chunks of images whose longest texts are alike, and within a chunk in
        # groups of images with as many texts (a web text missing, say): each group's texts are
        # one query sequence per image against its keys and values, which are never copied per
        # text. Base at 384 px on an H100, 512 images of which 4% lacked a web text: copying
        # them per text (`image_index`) took 38 ms of GPU time a batch.
        counts = [len(ts) for ts in texts]
        first = np.cumsum([0, *counts[:-1]])  # each image's first text
        scored = np.flatnonzero(counts)  # images with texts
        longest = np.zeros(len(texts), dtype=np.int64)
        longest[scored] = np.maximum.reduceat(lengths.numpy(), first[scored])
        for chunk in _length_chunks(torch.from_numpy(longest), counts, self.batch_size):
            groups: dict[int, list[int]] = {}
            for i in chunk.tolist():
                if counts[i]:
                    groups.setdefault(counts[i], []).append(i)
            for n, picked in groups.items():
                rows = torch.tensor(
                    [r for i in picked for r in range(first[i], first[i] + n)], device=self.device
                )
                sub_ids, sub_mask = _trimmed(ids, mask, rows)
                group_embeds = embeds.index_select(0, torch.tensor(picked, device=self.device))
                logits = med.itm_logits(group_embeds, sub_ids, sub_mask, texts_per_image=n)
                itm[rows] = logits.float().softmax(-1)[:, 1]
        for i, text, p, c in zip(owner, flat, itm.tolist(), itc.tolist()):
            results[i].append(TextScore(text, p, c))
        return results


def _length_chunks(lengths: torch.Tensor, sizes: Sequence[int], budget: int) -> list[torch.Tensor]:
    """Items (texts, or images with `sizes` texts each) ordered by `lengths`, cut into chunks of
    consecutive items holding at most `budget` texts (an item larger than that alone): each chunk
    is then padded only to its own longest text. -> the item indices of each chunk."""
    order = torch.argsort(lengths, stable=True).tolist()
    chunks: list[list[int]] = [[]]
    held = 0
    for item in order:
        if chunks[-1] and held + sizes[item] > budget:
            chunks.append([])
            held = 0
        chunks[-1].append(item)
        held += sizes[item]
    return [torch.tensor(c) for c in chunks if c]


def _trimmed(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """These rows' ids and mask without the trailing columns that are padding in all of them."""
    sub_ids, sub_mask = ids.index_select(0, rows), mask.index_select(0, rows)
    held = sub_mask.any(dim=0).nonzero()
    width = int(held[-1]) + 1 if held.numel() else 1
    return sub_ids[:, :width], sub_mask[:, :width]
