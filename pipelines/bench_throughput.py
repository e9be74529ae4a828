"""`capfilt bench throughput`: CapFilt's speed, side by side with transformers, on one machine.

One run builds the inputs once (web pairs of the built-in world, decoded and resized as the
cleaning job's decode stage leaves them), one captioner and one filter checkpoint (random weights
of a named size unless given), and exports both to transformers' BLIP classes. Then it times:

    (a) transformers   the loop a user would write: `BlipForConditionalGeneration.generate` with
                       nucleus sampling, then `BlipForImageTextRetrieval` ITM on (image, web text)
                       and on (image, synthetic caption); every call encodes the image again.
    (b) exact / fast   our `curate` (Captioner + Filter, as the cleaning job runs them): one image
                       encoding per model, KV cache with the image's cross-attention keys and values,
                       finished rows leave the batch; "fast" is bf16 on a GPU (fp16 before
                       Ampere) or an AMX CPU, int8 on other CPUs.
    (c) job            the whole `capfilt clean` job on a local Ray over the same pairs.

and checks what makes the comparison fair: greedy captions identical to transformers', ITM
probabilities within 1e-4, and fast mode's keep/drop decisions against exact mode's. Model FLOPs
are counted from the architecture (matmuls and attention), and divided by the time and by a dense
matmul's FLOP/s measured in the same run: the model FLOP utilisation (MFU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from capfilt.curate import curate
from capfilt.decision import Rule
from capfilt.errors import CapfiltError
from capfilt.images import open_image, preprocess
from capfilt.inference import CAPFILT_SAMPLING, Captioner, Filter, fast_cpu_kind, fast_dtype
from capfilt.model.checkpoint import export_transformers, for_role, load_checkpoint, new_checkpoint
from capfilt.model.config import FINETUNE_IMAGE_SIZE, SIZES, MEDConfig
from capfilt.model.generate import GenerationConfig
from capfilt.model.tokenizer import CaptionTokenizer, train_tokenizer
from capfilt.model.vit import conv_stem_channels
from capfilt.text import pre_caption

from .bench_cli import PATHS

log = logging.getLogger(__name__)

BERT_VOCAB = 30524  # bert-base-uncased + [DEC] + [ENC]: what a real BLIP checkpoint's LM head computes


@dataclass
class ThroughputConfig:
    size: str = "small"
    pairs: int = 256  # web pairs timed by every path
    batch_size: int = 32  # images per model batch, in every path
    image_size: int | None = None  # default: the size's fine-tuning resolution (small 64, base 384)
    device: str = "auto"  # "auto": cuda when there is one
    paths: tuple[str, ...] = PATHS
    captioner: str | None = None  # default: random weights of `size`
    filter: str | None = None
    max_tokens: int = 30  # nucleus caption length bound, the [SEP] included (BLIP: 30)
    check_images: int = 16  # images of the exactness checks (greedy captions, ITM)
    threads: int | None = None  # torch threads for (a) and (b); default: torch's
    seed: int = 0
    repeats: int = 3  # interleaved rounds of the timed paths; each path's time is its median round
    scaling: tuple[int, ...] = ()  # pair counts for the cleaning job's scaling run (e.g. 1000 10000)
    workdir: str | None = None  # default: a temporary directory, removed afterwards

    def validate(self) -> None:
        def bad(option: str, why: str) -> CapfiltError:
            return CapfiltError(f"--{option} {why}")

        if self.size not in SIZES:
            raise bad("size", f"must be one of {', '.join(SIZES)}; got {self.size!r}")
        if self.pairs < 1:
            raise bad("pairs", f"must be >= 1; got {self.pairs}")
        if self.batch_size < 1:
            raise bad("batch-size", f"must be >= 1; got {self.batch_size}")
        if self.image_size is not None and self.image_size < 8:
            raise bad("image-size", f"must be >= 8; got {self.image_size}")
        unknown = [p for p in self.paths if p not in PATHS]
        if unknown or not self.paths:
            raise bad("paths", f"takes some of {', '.join(PATHS)}; got {', '.join(self.paths) or 'none'}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", f"must be auto, cpu or cuda; got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise bad("device", "cuda: no GPU is visible to torch here")
        if self.repeats < 1:
            raise bad("repeats", f"must be >= 1; got {self.repeats}")
        if self.max_tokens < 5:
            raise bad("max-tokens", f"must be >= 5 (BLIP's minimum caption length); got {self.max_tokens}")
        if any(n < 1 for n in self.scaling):
            raise bad("scaling", f"pair counts must be >= 1; got {list(self.scaling)}")
        for option, path in (("captioner", self.captioner), ("filter", self.filter)):
            if path is not None and not Path(path).exists():
                raise bad(option, f"{path}: checkpoint not found")


@dataclass
class PathResult:
    name: str
    pairs: int
    seconds: float
    pairs_per_s: float
    model_tflops: float  # model FLOPs of the work done (our count), over the time, in TFLOP/s
    mfu: float  # model_tflops / the measured dense-matmul TFLOP/s
    notes: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- FLOPs


def vit_flops(config: MEDConfig) -> float:
    """Forward FLOPs of the image encoder on one image (2 per multiply-add; matmuls and attention)."""
    v = config.vision
    n = (v.image_size // v.patch_size) ** 2
    T, D, hidden = n + 1, v.width, int(v.width * v.mlp_ratio)
    if v.stem == "conv":  # stride-2 3x3 convolutions, then a 1x1 projection
        patch, channels, side = 0, 3, v.image_size
        for out in conv_stem_channels(v.patch_size, D):
            side //= 2
            patch += 2 * side * side * 9 * channels * out
            channels = out
        patch += 2 * n * channels * D
    else:
        patch = 2 * n * 3 * v.patch_size**2 * D
    layer = 2 * T * D * 4 * D + 2 * 2 * T * D * hidden + 2 * 2 * T * T * D  # qkv+proj, MLP, QK^T and AV
    return float(patch + v.depth * layer)


def _text_layer_flops(config: MEDConfig, L: int, past: int, cross: bool, image_kv: bool) -> float:
    """One text layer on L new tokens after `past` cached ones; `image_kv`: also project the
    image tokens to cross-attention keys and values (once per image row, then cached)."""
    t, Dv = config.text, config.vision.width
    D, T = t.width, (config.vision.image_size // config.vision.patch_size) ** 2 + 1
    flops = 2 * L * D * 4 * D + 2 * 2 * L * (past + L) * D + 2 * 2 * L * D * t.intermediate
    if cross:
        flops += 2 * L * D * 2 * D + 2 * 2 * L * T * D
        if image_kv:
            flops += 2 * T * Dv * 2 * D
    return float(flops)


def text_flops(config: MEDConfig, L: int, cross: bool) -> float:
    """A whole text pass over L tokens: ITM (cross=True, image K/V projected for this row) or ITC."""
    return config.text.depth * _text_layer_flops(config, L, 0, cross, image_kv=cross)


def caption_flops(config: MEDConfig, prompt: int, generated: Sequence[int]) -> float:
    """Prefill of the prompt (with the image's K/V) and one cached step per generated token,
    with the LM head on every step; `generated`: tokens each row produced (the [SEP] included)."""
    t = config.text
    head = 2 * t.width * t.width + 2 * t.width * t.vocab_size
    total = t.depth * _text_layer_flops(config, prompt, 0, True, image_kv=True) + head
    for steps in generated:
        for i in range(1, steps):  # the first token comes from the prefill's logits
            total += t.depth * _text_layer_flops(config, 1, prompt + i - 1, True, image_kv=False) + head
    return float(total)


def capfilt_flops(
    cap: MEDConfig, filt: MEDConfig, prompt: int, generated: Sequence[int], text_len: int
) -> float:
    """Model FLOPs of CapFilt on len(generated) images, each with a web text and one caption:
    two image encodings, the captions, and ITM + ITC of two texts per image."""
    n = len(generated)
    return (
        n * (vit_flops(cap) + vit_flops(filt))
        + caption_flops(cap, prompt, generated)
        + 2 * n * (text_flops(filt, text_len, True) + text_flops(filt, text_len, False))
    )


FAST_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # matmul_tflops keys of fast mode's dtypes


def matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Dense matmul TFLOP/s on `device` (the best of a few square sizes), the MFU denominator."""
    best = 0.0
    sizes = (2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        _sync(device)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(sizes):
            torch.mm(a, b)
            reps += 1
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- inputs and models


@dataclass
class Inputs:
    keys: list[str]
    images: list[
        np.ndarray
    ]  # (S, S, 3) uint8 pixels at the models' size: what the job's decode stage hands its model stages
    web_texts: list[str]
    shards: Path  # the same pairs as img2dataset shards, for the cleaning job


def shard_size_for(pairs: int, batch_size: int) -> int:
    """About ten shards (at most img2dataset-like 1000 pairs each), so that several are in flight
    at once and the job's steady rate is read over many of them."""
    return min(1000, max(2 * batch_size, pairs // 10))


def make_inputs(out: Path, pairs: int, image_size: int, seed: int, shard_size: int = 1000) -> Inputs:
    """`pairs` web pairs of the built-in world, as shards and as decoded images."""
    from capfilt.pipelines.clean_inputs import read_input
    from capfilt.world import synthesize

    world = synthesize(out, web=pairs, human=0, test=0, seed=seed, image_size=64, shard_size=shard_size)
    keys, images, texts = [], [], []
    for shard in world.shards["web"]:
        samples, _ = read_input(str(shard))
        for s in samples:
            img = open_image(s.image, name=s.key).resize((image_size, image_size), Image.Resampling.BICUBIC)
            keys.append(s.key)
            images.append(np.asarray(img, dtype=np.uint8))
            texts.append(s.text or "")
    return Inputs(keys, images, texts, out / "web")


def bench_tokenizer(size: str) -> CaptionTokenizer:
    """The world's words, padded with filler words to BERT's vocabulary for base and large, so
    the LM head and the sampler cost what they cost with a real BLIP checkpoint."""
    words = _world_words()
    target = BERT_VOCAB if size in ("base", "large") else 4000
    filler = [f"w{i:05d}" for i in range(max(0, target - len(words)))]
    return train_tokenizer([" ".join(words), *filler], vocab_size=target)


def _world_words() -> list[str]:
    import random

    from capfilt.world.scene import sample_scene
    from capfilt.world.texts import human_captions

    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(300):
        for caption in human_captions(sample_scene(rng), rng, 3):
            words.update(caption.lower().split())
    return sorted(words)


def make_checkpoints(config: ThroughputConfig, image_size: int, out: Path) -> tuple[Path, Path]:
    """Captioner and filter directories: the given ones, or random weights of the size."""
    from capfilt.model.checkpoint import save_checkpoint

    if config.captioner and config.filter:
        return Path(config.captioner), Path(config.filter)
    tokenizer = bench_tokenizer(config.size)
    paths = []
    for i, role in enumerate(("captioner", "filter")):
        given = config.captioner if role == "captioner" else config.filter
        if given:
            paths.append(Path(given))
            continue
        torch.manual_seed(config.seed + i)
        ckpt = new_checkpoint(config.size, tokenizer, role="pretrain", image_size=image_size)
        paths.append(save_checkpoint(for_role(ckpt, role), out / role))
    return paths[0], paths[1]


# ----------------------------------------------------------------------------- (a) transformers


class TransformersLoop:
    """What a user writes with transformers' BLIP classes (same weights, exported by us)."""

    def __init__(self, captioner: Path, filt: Path, workdir: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval

        from capfilt.model.checkpoint import CheckpointError

        ours_cap, ours_filt = load_checkpoint(captioner), load_checkpoint(filt)
        try:
            cap_dir = export_transformers(ours_cap, workdir / "hf_captioner", "captioning")
            filt_dir = export_transformers(ours_filt, workdir / "hf_filter", "retrieval")
        except CheckpointError as err:
            raise CapfiltError(
                f"path (a) runs transformers' BLIP classes on the same weights, and {err}; "
                "time the other paths with --paths exact fast job"
            ) from err
        self.cap = BlipForConditionalGeneration.from_pretrained(str(cap_dir), dtype=dtype).to(device).eval()
        self.filt = BlipForImageTextRetrieval.from_pretrained(str(filt_dir), dtype=dtype).to(device).eval()
        self.tok = AutoTokenizer.from_pretrained(str(cap_dir))
        self.config, self.filter_config = ours_cap.config, ours_filt.config
        self.enc_id = self.filter_config.text.enc_token_id
        self.device, self.dtype = device, dtype

    def pixels(self, images: Sequence[np.ndarray] | torch.Tensor, config: MEDConfig) -> torch.Tensor:
        """`pixel_values` for the model of `config`; a tensor is taken as already prepared."""
        if isinstance(images, torch.Tensor):
            return images
        v = config.vision
        return preprocess(images, v.image_size, config.image_mean, config.image_std, self.device).to(
            self.dtype
        )

    def _same_pixels(self) -> bool:
        a, b = self.config, self.filter_config
        return (a.vision.image_size, a.image_mean, a.image_std) == (
            b.vision.image_size,
            b.image_mean,
            b.image_std,
        )

    @torch.inference_mode()
    def caption(
        self, images: Sequence[np.ndarray] | torch.Tensor, gen: GenerationConfig, seed: int
    ) -> list[list[int]]:
        """Generated token ids per image (prompt excluded, cut before [SEP])."""
        B = len(images)
        enc = self.tok([self.config.prompt] * B, return_tensors="pt").to(self.device)
        sampling = gen.method == "nucleus"
        if sampling:
            torch.manual_seed(seed)
        out = self.cap.generate(
            pixel_values=self.pixels(images, self.config),
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            do_sample=sampling,
            top_p=gen.top_p if sampling else None,
            top_k=gen.top_k if sampling else None,  # 0 turns generate's default of 50 off
            num_beams=1,
            max_new_tokens=gen.max_tokens,
            min_new_tokens=gen.min_tokens,
            repetition_penalty=gen.repetition_penalty,
        )
        prompt = enc["input_ids"].shape[1] - 1  # generate drops the prompt's [SEP]
        sep = self.config.text.sep_token_id
        rows = out[:, prompt:].tolist()
        return [row[: row.index(sep)] if sep in row else row for row in rows]

    @torch.inference_mode()
    def itm(self, images: Sequence[np.ndarray] | torch.Tensor, texts: Sequence[str]) -> list[float]:
        """p(match) of each (image, text) pair with `[ENC]` at position 0, as BLIP computes ITM."""
        enc = self.tok(
            [pre_caption(t) for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.filter_config.max_text_tokens,
            return_tensors="pt",
        ).to(self.device)
        ids = enc["input_ids"].clone()
        ids[:, 0] = self.enc_id
        out = self.filt(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            pixel_values=self.pixels(images, self.filter_config),
            use_itm_head=True,
        )
        return out.itm_score.float().softmax(-1)[:, 1].tolist()

    def run(self, inputs: Inputs, batch_size: int, gen: GenerationConfig, seed: int) -> list[int]:
        """CapFilt over `inputs`; returns the generated length of every caption (for FLOPs)."""
        lengths = []
        for start in range(0, len(inputs.images), batch_size):
            images = inputs.images[start : start + batch_size]
            # pixel_values prepared once per batch and passed to all three calls, as a user would
            cap_pixels = self.pixels(images, self.config)
            filt_pixels = cap_pixels if self._same_pixels() else self.pixels(images, self.filter_config)
            ids = self.caption(cap_pixels, gen, seed + start)
            captions = self.tok.batch_decode(ids, skip_special_tokens=True)
            self.itm(filt_pixels, inputs.web_texts[start : start + batch_size])
            self.itm(filt_pixels, [c.strip() for c in captions])
            lengths.extend(min(len(r) + 1, gen.max_tokens) for r in ids)
        _sync(self.device)
        return lengths


# ----------------------------------------------------------------------------- (b) ours


def run_ours(
    captioner: Captioner, filt: Filter, inputs: Inputs, batch_size: int, gen: GenerationConfig, seed: int
) -> list[Any]:
    """`curate` batch by batch, as a model actor runs it; -> curated rows."""
    rows = []
    for start in range(0, len(inputs.images), batch_size):
        sl = slice(start, start + batch_size)
        rows.extend(
            curate(
                captioner, filt, inputs.images[sl], inputs.keys[sl], inputs.web_texts[sl], Rule(), gen, seed
            )
        )
    _sync(captioner.device)
    return rows


def caption_lengths(captioner: Captioner, rows: Sequence[Any], gen: GenerationConfig) -> list[int]:
    """Generated tokens of each row's first synthetic caption, its [SEP] included (for FLOPs;
    counted after the timing)."""
    tok = captioner.ckpt.tokenizer
    lengths = []
    for c in rows:
        n = len(tok.hf(c.synthetic[0].text, add_special_tokens=False)["input_ids"]) if c.synthetic else 0
        lengths.append(min(n + 1, gen.max_tokens))
    return lengths


def decisions(rows: Sequence[Any]) -> list[tuple[bool, bool]]:
    """(web kept, synthetic kept) per sample."""
    return [(r.decision.web_kept, r.decision.synthetic_kept is not None) for r in rows]


# ----------------------------------------------------------------------------- (c) the job


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray's processes when this
    driver started Ray), sampled every `interval` seconds from /proc."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process that ended meanwhile
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def run_job(
    shards: Path,
    captioner: Path,
    filt: Path,
    out: Path,
    batch_size: int,
    seed: int,
    num_gpus: float | None = None,
) -> dict[str, Any]:
    """The cleaning job over `shards` on the running Ray; wall time, steady-state rate, peak RSS.
    `num_gpus`: the job's option (None: its own choice from the cluster; 0: CPUs)."""
    from capfilt.pipelines.clean import CleanConfig, clean

    done: list[tuple[float, int]] = []
    start = time.perf_counter()

    def progress(shards_done: int, total: int, samples: int) -> None:
        done.append((time.perf_counter() - start, samples))

    with PeakMemory() as memory:
        summary = clean(
            CleanConfig(
                inputs=[str(shards)],
                output=str(out),
                captioner=str(captioner),
                filter=str(filt),
                batch_size=batch_size,
                seed=seed,
                num_gpus=num_gpus,
            ),
            progress=progress,
        )
    wall = time.perf_counter() - start
    _wait_for_model_actors_to_exit()
    first = summary.timings.get("first_shard_s", 0.0)
    # Steady state: the rate while the middle 80% of the samples were scored (progress counts them
    # batch by batch as they leave the filter), so neither the start-up and the pipeline's filling
    # nor its draining at the end counts. A job whose cost per pair grew with its length (state
    # piling up) would show it in the two halves of that window.
    moved = [(t, n) for t, n in done if n > 0]
    steady = _window_rate(moved, 0.1, 0.9)
    halves = [_window_rate(moved, 0.1, 0.5), _window_rate(moved, 0.5, 0.9)]
    return {
        "pairs": summary.run_samples,
        "wall_s": wall,
        "pairs_per_s": summary.run_samples / wall,
        "web_s": summary.timings.get("web_s"),
        "first_shard_s": first,
        "steady_pairs_per_s": steady,
        "steady_pairs_per_s_halves": halves if None not in halves else None,
        "peak_rss_gb": memory.peak / 1e9,
        "resources": summary.resources,  # the model actors the job chose
    }


def _wait_for_model_actors_to_exit(timeout: float = 30.0) -> None:
    """Ray ends a finished job's model actors (about 1 GB each) after the job returns, and the
    peak counts every process under this driver, so a job started meanwhile can count them too.
    In stop 22, without this wait, the 1k-pair jobs after a 512-pair one read 5.3-7.2 GB peaks and
    the 10k jobs 5.4-5.5; with it, 5.25-5.26 and 5.44-5.49."""
    import psutil

    def is_model_actor(p: psutil.Process) -> bool:
        try:
            command = p.cmdline()
        except psutil.Error:  # ended meanwhile
            return False
        return bool(command) and command[0].startswith("ray::MapWorker")

    me, deadline = psutil.Process(), time.monotonic() + timeout
    while any(is_model_actor(p) for p in me.children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.2)


def _window_rate(moved: list[tuple[float, int]], lo: float, hi: float) -> float | None:
    """Samples per second between the moments the `lo` and the `hi` share of all samples had been
    scored, from (seconds, samples scored so far) points; None when the points cannot tell."""
    if not moved or moved[-1][1] <= 0:
        return None
    total = moved[-1][1]
    a = next(p for p in moved if p[1] >= lo * total)
    b = next(p for p in moved if p[1] >= hi * total)
    if b[0] <= a[0] or b[1] <= a[1]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


# ----------------------------------------------------------------------------- the bench


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def run_throughput(config: ThroughputConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns every figure as a JSON-able dict (see the module docstring)."""
    config.validate()
    say = progress or (lambda message: log.info("%s", message))
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    image_size = config.image_size or FINETUNE_IMAGE_SIZE[config.size]
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-", dir=config.workdir) as tmp:
        work = Path(tmp)
        say(f"inputs: {config.pairs} web pairs of the built-in world at {image_size} px")
        inputs = make_inputs(
            work / "world",
            config.pairs,
            image_size,
            config.seed,
            shard_size_for(config.pairs, config.batch_size),
        )
        cap_path, filt_path = make_checkpoints(config, image_size, work)
        result: dict[str, Any] = {
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "workdir"},
            "machine": machine(),
            "device": str(device),
            "image_size": image_size,
        }
        exact_dtype = torch.float32
        result["matmul_tflops"] = {"fp32": matmul_tflops(device, torch.float32)}
        # fast mode's MFU is against the matmul of its dtype: bf16 on a GPU or an AMX CPU, fp16 on
        # GPUs without bf16; the int8 CPU path is held against fp32. A GPU's is measured always.
        fast_torch_dtype = fast_dtype(device)
        fast_key = FAST_KEYS.get(fast_torch_dtype, "fp32")
        if fast_key != "fp32" and (device.type == "cuda" or "fast" in config.paths):
            result["matmul_tflops"][fast_key] = matmul_tflops(device, fast_torch_dtype)
        gen = dataclasses.replace(CAPFILT_SAMPLING, max_tokens=config.max_tokens, seed=config.seed)
        paths: dict[str, PathResult] = {}

        captioner = Captioner(cap_path, device=device, batch_size=config.batch_size, generation=gen)
        filt = Filter(filt_path, device=device, batch_size=config.batch_size)
        cap_cfg, filt_cfg = captioner.ckpt.config, filt.ckpt.config
        prompt_len = captioner.prompt_ids.numel()
        text_len = _mean_text_tokens(filt, inputs.web_texts)

        def record(name: str, seconds: float, lengths: list[int], peak_key: str, **notes: Any) -> None:
            flops = capfilt_flops(cap_cfg, filt_cfg, prompt_len, lengths, text_len)
            tflops = flops / seconds / 1e12
            peak = result["matmul_tflops"][peak_key]
            paths[name] = PathResult(
                name, len(lengths), seconds, len(lengths) / seconds, tflops, tflops / peak, notes
            )
            say(f"{name}: {len(lengths) / seconds:.1f} pairs/s")

        # Warm-up: one batch through our path (allocators, thread pools, lazy inits).
        warm = _subset(inputs, min(config.batch_size, config.pairs))
        run_ours(captioner, filt, warm, config.batch_size, gen, config.seed)

        # The timed paths run in interleaved rounds ((b) exact, (b) fast, (a), then again), and
        # each path's time is its median round: a machine whose speed drifts during the run moves
        # every path alike instead of the one that happened to run then.
        timed: dict[str, Callable[[], Any]] = {}
        if "exact" in config.paths:
            timed["exact"] = lambda: run_ours(captioner, filt, inputs, config.batch_size, gen, config.seed)
        fcap = ffilt = hf = None
        if "fast" in config.paths:
            fcap = Captioner(
                cap_path, device=device, batch_size=config.batch_size, generation=gen, precision="fast"
            )
            ffilt = Filter(filt_path, device=device, batch_size=config.batch_size, precision="fast")
            run_ours(fcap, ffilt, warm, config.batch_size, gen, config.seed)
            timed["fast"] = lambda: run_ours(fcap, ffilt, inputs, config.batch_size, gen, config.seed)
        if "transformers" in config.paths:
            hf = TransformersLoop(cap_path, filt_path, work, device, exact_dtype)
            hf.run(warm, config.batch_size, gen, config.seed)
            timed["transformers"] = lambda: hf.run(inputs, config.batch_size, gen, config.seed)
        rounds: dict[str, list[float]] = {name: [] for name in timed}
        outputs: dict[str, Any] = {}
        for r in range(config.repeats if timed else 0):
            for name, fn in timed.items():
                say(f"round {r + 1}/{config.repeats}: {PATH_TITLES[name]}")
                out, seconds = _timed(fn, device)
                rounds[name].append(seconds)
                outputs.setdefault(name, out)

        exact_rows: list[Any] = outputs.get("exact", [])
        if "exact" in timed:
            record(
                "exact",
                _median(rounds["exact"]),
                caption_lengths(captioner, exact_rows, gen),
                "fp32",
                round_seconds=rounds["exact"],
            )
            result["vit"] = _vit_stage(captioner, inputs, config.batch_size, result["matmul_tflops"]["fp32"])
        elif "fast" in timed:  # fast alone: exact mode's decisions on a sample, untimed
            sample = _subset(inputs, min(config.pairs, 4 * config.batch_size))
            exact_rows = run_ours(captioner, filt, sample, config.batch_size, gen, config.seed)
        if fcap is not None and ffilt is not None:
            fast_rows = outputs["fast"]
            compared = _subset(inputs, len(exact_rows))
            agreement = _agreement(exact_rows, fast_rows[: len(exact_rows)], ffilt, compared)
            record(
                "fast",
                _median(rounds["fast"]),
                caption_lengths(fcap, fast_rows, gen),
                fast_key,
                round_seconds=rounds["fast"],
                kind=fast_key if device.type == "cuda" else fast_cpu_kind(),
                **agreement,
            )
            result["vit_fast"] = _vit_stage(
                fcap,
                inputs,
                config.batch_size,
                result["matmul_tflops"][fast_key],
            )
            del fcap, ffilt
        if hf is not None:
            record(
                "transformers",
                _median(rounds["transformers"]),
                outputs["transformers"],
                "fp32",
                round_seconds=rounds["transformers"],
            )
            result["exactness"] = _exactness(hf, captioner, filt, _subset(inputs, config.check_images), gen)
            if "exact" in timed:
                result["round_ratios"] = [a / b for a, b in zip(rounds["transformers"], rounds["exact"])]
                stage_inputs = _subset(inputs, min(config.pairs, 4 * config.batch_size))
                result["stages"] = _stages(
                    hf, captioner, filt, stage_inputs, config.batch_size, gen, config.seed
                )
            del hf

        if "job" in config.paths or config.scaling:
            result.update(_job_runs(config, inputs, cap_path, filt_path, work, say))
            if "job" in result:
                job = result["job"]
                rate = job["steady_pairs_per_s"] or job["pairs_per_s"]
                paths["job"] = PathResult(
                    "job",
                    job["pairs"],
                    job["wall_s"],
                    job["pairs_per_s"],
                    0.0,
                    0.0,
                    {"steady_pairs_per_s": rate},
                )

        result["paths"] = {name: dataclasses.asdict(p) for name, p in paths.items()}
        result["ratios"] = _ratios(paths)
    return result


PATH_TITLES = {
    "exact": "(b) exact: our Captioner + Filter, fp32",
    "fast": "(b) fast: bf16 on a GPU (fp16 before Ampere) or an AMX CPU, int8 dynamic quantisation on other CPUs",
    "transformers": "(a) transformers: BlipForConditionalGeneration.generate + BlipForImageTextRetrieval",
}


def _median(values: Sequence[float]) -> float:
    return float(np.median(values))


def _stages(
    hf: TransformersLoop,
    captioner: Captioner,
    filt: Filter,
    inputs: Inputs,
    batch_size: int,
    gen: GenerationConfig,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Where each path's time goes, per pair (ms), each stage timed alone over the same batches:
    image encodings, caption decoding (generate, less its image encoding), and text scoring
    (ITM, and ITC in ours, less the image encoding). Also the bound this puts on (b) / (a):
    their ratio if our decoding took no time at all."""
    device = captioner.device
    t = {
        "a": dict.fromkeys(("images", "decoding", "scoring"), 0.0),
        "b": dict.fromkeys(("images", "decoding", "scoring"), 0.0),
    }
    with torch.inference_mode():
        for start in range(0, len(inputs.images), batch_size):
            sl = slice(start, start + batch_size)
            images = inputs.images[sl]
            # (a): the three calls a user makes, and one image encoding alone
            px = hf.pixels(images, hf.config)
            _, vision = _timed(partial(hf.cap.vision_model, pixel_values=px), device)
            ids, caption = _timed(partial(hf.caption, px, gen, seed + start), device)
            captions = [c.strip() for c in hf.tok.batch_decode(ids, skip_special_tokens=True)]
            _, itm_web = _timed(partial(hf.itm, px, inputs.web_texts[sl]), device)
            _, itm_syn = _timed(partial(hf.itm, px, captions), device)
            t["a"]["images"] += 3 * vision
            t["a"]["decoding"] += caption - vision
            t["a"]["scoring"] += itm_web + itm_syn - 2 * vision
            # (b): what `curate` runs, stage by stage
            stacked = captioner.stack(images)
            pixels = captioner.pixels(stacked)
            _, vit_cap = _timed(partial(captioner.med.encode_image, pixels), device)
            _, vit_filt = _timed(partial(filt.med.encode_image, pixels), device)
            ours, caption = _timed(partial(captioner.caption, stacked, gen), device)
            texts = [[w, c[0]] for w, c in zip(inputs.web_texts[sl], ours)]
            _, score = _timed(partial(filt.score, stacked, texts), device)
            t["b"]["images"] += vit_cap + vit_filt
            t["b"]["decoding"] += caption - vit_cap
            t["b"]["scoring"] += score - vit_filt
    n = len(inputs.images)
    out = {path: {k: 1000 * v / n for k, v in stages.items()} for path, stages in t.items()}
    total_a, total_b = sum(out["a"].values()), sum(out["b"].values())
    out["bounds"] = {
        "exact_over_transformers": total_a / total_b,
        "without_our_decoding": total_a / (total_b - out["b"]["decoding"]),
    }
    return out


def _subset(inputs: Inputs, n: int) -> Inputs:
    return Inputs(inputs.keys[:n], inputs.images[:n], inputs.web_texts[:n], inputs.shards)


def _mean_text_tokens(filt: Filter, texts: Sequence[str]) -> int:
    _, mask = filt.ckpt.tokenizer([pre_caption(t) for t in texts], filt.ckpt.config.max_text_tokens)
    return max(1, round(float(mask.sum(1).float().mean())))


def _vit_stage(captioner: Captioner, inputs: Inputs, batch_size: int, peak_tflops: float) -> dict[str, float]:
    """The image encoder alone, batch after batch over the inputs: its FLOP/s against the matmul's."""
    batches = [
        captioner.pixels(inputs.images[s : s + batch_size]) for s in range(0, len(inputs.images), batch_size)
    ]
    with torch.inference_mode():
        captioner.med.encode_image(batches[0])
        _, seconds = _timed(lambda: [captioner.med.encode_image(b) for b in batches], captioner.device)
    flops = vit_flops(captioner.ckpt.config) * len(inputs.images)
    tflops = flops / seconds / 1e12
    return {"images_per_s": len(inputs.images) / seconds, "tflops": tflops, "mfu": tflops / peak_tflops}


def _agreement(exact: Sequence[Any], fast: Sequence[Any], ffilt: Filter, inputs: Inputs) -> dict[str, float]:
    """Fast mode against exact mode: the keep/drop decisions on the web texts (same texts), the
    fast filter's decisions on exact mode's captions, and how many captions are identical."""
    web = [e.decision.web_kept == f.decision.web_kept for e, f in zip(exact, fast) if e.web_itm is not None]
    captions = [e.synthetic[0].text for e in exact]
    rescored = ffilt.score(inputs.images, [[c] for c in captions])
    rule = Rule()
    syn = [
        (e.synthetic[0].itm > rule.threshold) == (r[0].itm > rule.threshold) for e, r in zip(exact, rescored)
    ]
    same = [e.synthetic[0].text == f.synthetic[0].text for e, f in zip(exact, fast)]
    deltas = [abs(e.web_itm - f.web_itm) for e, f in zip(exact, fast) if e.web_itm is not None]
    return {
        "decision_agreement": (sum(web) + sum(syn)) / max(1, len(web) + len(syn)),
        "web_decision_agreement": sum(web) / max(1, len(web)),
        "synthetic_decision_agreement": sum(syn) / max(1, len(syn)),
        "identical_captions": sum(same) / max(1, len(same)),
        "web_itm_max_abs_diff": max(deltas, default=0.0),
    }


def _exactness(
    hf: TransformersLoop, captioner: Captioner, filt: Filter, inputs: Inputs, gen: GenerationConfig
) -> dict[str, Any]:
    """Greedy captions against transformers' token for token, and ITM p(match) of the web texts
    and the captions against transformers' (same weights, same pixels)."""
    greedy = dataclasses.replace(gen, method="greedy", num_captions=1)
    ours = captioner.caption(inputs.images, greedy)
    theirs = hf.tok.batch_decode(hf.caption(inputs.images, greedy, 0), skip_special_tokens=True)
    identical = sum(o[0] == t.strip() for o, t in zip(ours, theirs))
    texts = [*inputs.web_texts, *[o[0] for o in ours]]
    images = [*inputs.images, *inputs.images]
    our_itm = [s[0].itm for s in filt.score(images, [[t] for t in texts])]
    their_itm = hf.itm(images, texts)
    return {
        "images": len(inputs.images),
        "greedy_identical": identical,
        "itm_max_abs_diff": float(np.max(np.abs(np.array(our_itm) - np.array(their_itm)))),
        "itm_texts": len(texts),
    }


def _job_runs(
    config: ThroughputConfig,
    inputs: Inputs,
    cap: Path,
    filt: Path,
    work: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """(c) and the scaling run, on one local Ray that this function starts and stops."""
    import ray

    from capfilt.world import synthesize

    out: dict[str, Any] = {}
    # The job on the bench's device: on a CPU run, CPU actors even where the machine has a GPU.
    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    num_gpus = None if on_gpu else 0.0
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        if "job" in config.paths:
            say("(c) job: capfilt clean on a local Ray")
            out["job"] = run_job(
                inputs.shards, cap, filt, work / "job", config.batch_size, config.seed, num_gpus
            )
        rows = []
        # One shard size for every run (the smallest run's): a larger job is more of the same
        # shards, so a change in time per pair is the job's scaling, not its shards' size.
        shard_size = shard_size_for(min(config.scaling, default=1), config.batch_size)
        for n in config.scaling:
            say(f"scaling: capfilt clean over {n} pairs in shards of {shard_size}")
            world = work / f"scale-{n}"
            synthesize(world, web=n, human=0, test=0, seed=config.seed, image_size=64, shard_size=shard_size)
            job = run_job(
                world / "web", cap, filt, work / f"scale-{n}-out", config.batch_size, config.seed, num_gpus
            )
            job["seconds_per_pair"] = job["wall_s"] / max(1, job["pairs"])  # start-up included
            steady = job["steady_pairs_per_s"]
            job["steady_seconds_per_pair"] = 1 / steady if steady else None  # start-up excluded
            job["shard_size"] = shard_size
            rows.append(job)
        if rows:
            out["scaling"] = rows
    finally:
        if started:
            ray.shutdown()
    return out


def _ratios(paths: dict[str, PathResult]) -> dict[str, float]:
    rate = {name: p.pairs_per_s for name, p in paths.items()}
    out = {}
    if "transformers" in rate:
        for name in ("exact", "fast"):
            if name in rate:
                out[f"{name}_over_transformers"] = rate[name] / rate["transformers"]
    if "job" in paths and "exact" in rate:
        out["job_over_exact"] = paths["job"].pairs_per_s / rate["exact"]
        out["job_steady_over_exact"] = paths["job"].notes["steady_pairs_per_s"] / rate["exact"]
    return out
