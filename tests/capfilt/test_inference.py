"""Captioner and Filter: batching never changes an answer; images decode as a person sees them."""

from __future__ import annotations

import io
import math
import platform

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.images import ImageError, open_image, preprocess, stack_pixels
from capfilt.inference import Captioner, Filter
from capfilt.model.checkpoint import CheckpointError
from capfilt.model.generate import GenerationConfig


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def test_filter_scores_do_not_depend_on_batching(our_filter_dir):
    images = _images(5)
    texts = [["a red circle", "two green squares"], [], ["a cat"], ["a dog", "a sofa", "sunset"], ["stars"]]
    whole = Filter(our_filter_dir, batch_size=8).score(images, texts)
    small = Filter(our_filter_dir, batch_size=2).score(images, texts)
    alone = [Filter(our_filter_dir).score([img], [ts])[0] for img, ts in zip(images, texts)]
    assert [len(s) for s in whole] == [2, 0, 1, 3, 1]
    for a, b, c in zip(whole, small, alone):
        for x, y, z in zip(a, b, c):
            assert x.text == y.text == z.text
            assert x.itm == pytest.approx(y.itm, abs=1e-5) and x.itm == pytest.approx(z.itm, abs=1e-5)
            assert x.itc == pytest.approx(y.itc, abs=1e-5) and x.itc == pytest.approx(z.itc, abs=1e-5)


def test_nucleus_captions_are_reproducible_per_image_whatever_the_batch(our_captioner_dir):
    images = _images(4)
    gen = GenerationConfig(
        method="nucleus", num_captions=3, repetition_penalty=1.1, max_tokens=10, min_tokens=2
    )
    cap = Captioner(our_captioner_dir, batch_size=4, generation=gen)
    seeds = [101, 202, 303, 404]
    together = cap.caption(images, seeds=seeds)
    reversed_order = cap.caption(images[::-1], seeds=seeds[::-1])[::-1]
    one_by_one = [
        Captioner(our_captioner_dir, batch_size=1, generation=gen).caption([im], seeds=[s])[0]
        for im, s in zip(images, seeds)
    ]
    assert together == reversed_order == one_by_one
    other_seed = cap.caption(images, seeds=[s + 1 for s in seeds])
    assert other_seed != together


def test_roles_are_enforced_when_hosting(our_filter_dir, our_captioner_dir):
    with pytest.raises(CheckpointError, match="cannot write captions"):
        Captioner(our_filter_dir)
    with pytest.raises(CheckpointError, match="cannot score texts"):
        Filter(our_captioner_dir)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_image_modes_become_rgb():
    rgb = Image.new("RGB", (20, 10), (200, 10, 10))
    cases = {
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "grey": _encode(rgb.convert("L"), "PNG"),
        "palette_alpha": _encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)).convert("P"), "PNG"),
        "rgba": _encode(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "PNG"),
        "webp": _encode(rgb, "WEBP"),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "16bit": _encode(Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)), "PNG"),
    }
    for name, data in cases.items():
        img = open_image(data, name=name)
        assert img.mode == "RGB", name
    # a fully transparent image is laid on white, not black
    assert open_image(cases["rgba"]).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    data = _encode(img, "JPEG", exif=exif.tobytes())
    assert open_image(data).size == (10, 30)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"", "image_empty"), (b"GIF89a garbage", "image_undecodable"), (b"<html></html>", "image_undecodable")],
)
def test_undecodable_images_have_reasons(payload, reason):
    with pytest.raises(ImageError) as exc:
        open_image(payload, name="sample-7")
    assert exc.value.reason == reason and "sample-7" in str(exc.value)


def test_decompression_bomb_is_refused():
    bomb = _encode(Image.new("L", (9000, 9000)), "PNG")  # small file, 81 M pixels
    with pytest.raises(ImageError) as exc:
        open_image(bomb, name="bomb.png", max_pixels=10_000_000)
    assert exc.value.reason == "image_too_large"


def test_preprocess_shape_and_normalisation():
    white = Image.new("RGB", (50, 20), (255, 255, 255))
    x = preprocess([white, white], 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 32, 32)
    assert float(x.min()) == pytest.approx(1.0) and float(x.max()) == pytest.approx(1.0)


def test_arrays_and_pil_images_give_the_same_pixels():
    rng = np.random.default_rng(3)
    arrays = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(70)]  # >= 64: threaded fill
    pil = [Image.fromarray(a) for a in arrays]
    stacked = stack_pixels(arrays, 32)
    assert stacked.dtype.is_floating_point is False and stacked.shape == (70, 32, 32, 3)
    assert np.array_equal(stacked.numpy(), np.stack(arrays))
    assert np.array_equal(stack_pixels(pil, 32).numpy(), stacked.numpy())
    mixed = [arrays[0], pil[1].resize((50, 20)), arrays[2][:16, :16]]  # off-size images are resized
    expected = [arrays[0], np.asarray(pil[1].resize((50, 20)).resize((32, 32), Image.Resampling.BICUBIC))]
    out = stack_pixels(mixed, 32).numpy()
    assert np.array_equal(out[0], expected[0]) and np.array_equal(out[1], expected[1])
    assert out.shape == (3, 32, 32, 3)
    mean, std = (0.48, 0.45, 0.4), (0.27, 0.26, 0.28)
    assert torch.equal(preprocess(arrays[:5], 32, mean, std), preprocess(pil[:5], 32, mean, std))


@pytest.mark.parametrize(
    "bad", [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3))]
)
def test_pixel_arrays_must_be_rgb_uint8(bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        stack_pixels([bad], 32)


def test_models_take_arrays_pil_or_a_stacked_batch(our_captioner_dir, our_filter_dir):
    images = _images(3)
    arrays = [np.asarray(i) for i in images]
    captioner, filt = Captioner(our_captioner_dir), Filter(our_filter_dir)
    greedy = GenerationConfig(method="greedy")
    expected = captioner.caption(images, greedy)
    assert captioner.caption(arrays, greedy) == expected
    assert captioner.caption(captioner.stack(images), greedy) == expected
    texts = [["a red circle"]] * 3
    assert filt.score(arrays, texts) == filt.score(images, texts)
    with pytest.raises(ValueError, match="stacked pixels must be"):
        filt.score(stack_pixels(images, 16), texts)
    with pytest.raises(ValueError, match="stacked pixels must be"):
        filt.score(stack_pixels(images, 32).float(), texts)


def test_texts_grouped_per_image_score_as_each_text_alone(our_filter_dir):
    """Every image with the same number of texts takes the grouped cross-attention path (one
    key/value projection per image); it must give what scoring each text on its own gives."""
    images = _images(5)
    texts = [[f"a red circle {i}", "two green squares and a long tail of words"] for i in range(5)]
    grouped = Filter(our_filter_dir, batch_size=4).score(images, texts)  # chunks of whole images
    for image, pair, scores in zip(images, texts, grouped):
        for text, score in zip(pair, scores):
            alone = Filter(our_filter_dir).score([image], [[text]])[0][0]
            assert score.text == text
            assert score.itm == pytest.approx(alone.itm, abs=1e-5)
            assert score.itc == pytest.approx(alone.itc, abs=1e-5)


def _assert_each_text_scores_as_alone(filter_dir, images, texts, scores) -> None:
    for image, row, scored in zip(images, texts, scores):
        assert [s.text for s in scored] == row
        for text, score in zip(row, scored):
            alone = Filter(filter_dir).score([image], [[text]])[0][0]
            assert score.itm == pytest.approx(alone.itm, abs=1e-5)
            assert score.itc == pytest.approx(alone.itc, abs=1e-5)


def test_images_with_different_numbers_of_texts_are_scored_in_groups_without_copies(
    our_filter_dir, monkeypatch
):
    """A chunk mixing images with 0, 1, 2 and 3 texts (web texts missing, several candidates)
    scores each count's images as one group, their keys and values never copied per text, and
    every score is what the text gets alone."""
    f = Filter(our_filter_dir, batch_size=16)  # one chunk holds every image
    texts = [["a red circle", "blue"], [], ["two squares"], ["a", "b c", "d e f"], ["x y"], ["p", "q"]]
    images = _images(len(texts))
    calls = []
    itm_logits = f.med.itm_logits

    def spy(embeds, ids, mask, **kw):
        calls.append((embeds.shape[0], ids.shape[0], kw))
        return itm_logits(embeds, ids, mask, **kw)

    monkeypatch.setattr(f.med, "itm_logits", spy)
    scores = f.score(images, texts)
    monkeypatch.undo()
    assert sorted((n_img, n_txt, kw.get("texts_per_image")) for n_img, n_txt, kw in calls) == [
        (1, 3, 3),
        (2, 2, 1),
        (2, 4, 2),
    ]
    assert all("image_index" not in kw for _, _, kw in calls)
    _assert_each_text_scores_as_alone(our_filter_dir, images, texts, scores)


def test_texts_are_scored_in_chunks_of_like_length_cut_to_their_longest(our_filter_dir, monkeypatch):
    """Short and long texts mixed in one batch: chunks hold texts (ITC) or images (ITM) of like
    length, each padded only to its own longest text, and every score is what the text gets alone."""

    f = Filter(our_filter_dir, batch_size=6)  # the 6 images in one batch, chunks of up to 6 texts
    short, long = "a cat", "two green squares and a long tail of many more words than the rest"
    texts = [[long, short], [short, short], [long, long], [short, short], [short, long], [short, short]]
    images = _images(len(texts))
    widths: dict[str, list[int]] = {"itc": [], "itm": []}
    text_feature, itm_logits = f.med.text_feature, f.med.itm_logits

    def spy_itc(ids, mask):
        widths["itc"].append(ids.shape[1])
        return text_feature(ids, mask)

    def spy_itm(embeds, ids, mask, **kw):
        widths["itm"].append(ids.shape[1])
        return itm_logits(embeds, ids, mask, **kw)

    monkeypatch.setattr(f.med, "text_feature", spy_itc)
    monkeypatch.setattr(f.med, "itm_logits", spy_itm)
    scores = f.score(images, texts)
    monkeypatch.undo()
    limit = f.ckpt.config.max_text_tokens
    full, narrow = (f.ckpt.tokenizer([t], limit)[0].shape[1] for t in (long, short))
    assert narrow < full
    assert widths["itc"] == [narrow, full]  # 6 of the 8 short texts, then 2 short and 4 long ones
    assert widths["itm"] == [narrow, full]  # 3 images a chunk, those with only short texts first
    _assert_each_text_scores_as_alone(our_filter_dir, images, texts, scores)


def test_length_chunks_order_and_budget():
    import torch

    from capfilt.inference import _length_chunks, _trimmed

    chunks = _length_chunks(torch.tensor([5, 1, 3, 1, 9]), [1, 2, 3, 1, 1], budget=3)
    assert [c.tolist() for c in chunks] == [[1, 3], [2], [0, 4]]  # an item over the budget goes alone
    ids = torch.tensor([[1, 2, 0, 0], [1, 0, 0, 0], [1, 2, 3, 0]])
    mask = (ids > 0).long()
    sub_ids, sub_mask = _trimmed(ids, mask, torch.tensor([0, 1]))
    assert sub_ids.tolist() == [[1, 2], [1, 0]] and sub_mask.tolist() == [[1, 1], [1, 0]]


def test_grouped_texts_must_divide_evenly(our_filter_dir):
    import torch

    f = Filter(our_filter_dir)
    embeds = f.med.encode_image(f.pixels(_images(2)))
    ids, mask = f.ckpt.tokenizer(["a", "b", "c"], 8)
    with pytest.raises(ValueError, match="3 texts are not 2 per image for 2 images"), torch.inference_mode():
        f.med.itm_logits(embeds, ids, mask, texts_per_image=2)


def test_fast_mode_leaves_a_callers_checkpoint_exact(our_filter_dir):
    """A Checkpoint object handed in is the caller's: fast mode quantises a copy, so an exact
    host built from the same object afterwards still scores exactly."""
    from capfilt.model.checkpoint import load_checkpoint

    images, texts = _images(3), [["a red circle"], ["two green squares"], ["a cat"]]
    expected = Filter(our_filter_dir).score(images, texts)
    shared = load_checkpoint(our_filter_dir)
    fast = Filter(shared, precision="fast")
    exact = Filter(shared)
    assert fast.med is not exact.med
    for want, got in zip(expected, exact.score(images, texts)):
        assert got[0].itm == pytest.approx(want[0].itm, abs=1e-6)
    for want, got in zip(expected, fast.score(images, texts)):
        assert got[0].itm == pytest.approx(want[0].itm, abs=0.05)  # bf16 or int8: close, not equal
    with pytest.raises(ValueError, match="precision must be one of exact, fast"):
        Filter(our_filter_dir, precision="fp8")


def test_packed_decoding_is_used_where_it_pays_and_keeps_captions_per_image(our_captioner_dir):
    from capfilt.model import packed

    assert not Captioner(our_captioner_dir).packed  # 32 wide: below PACK_MIN_WIDTH, where packing paid
    if not packed.available():
        pytest.skip("this torch has no MKL packed matmul")
    images = _images(4)
    gen = GenerationConfig(method="nucleus", num_captions=2, max_tokens=10, min_tokens=2)
    cap = Captioner(our_captioner_dir, batch_size=4, generation=gen, pack=True)
    plain = Captioner(our_captioner_dir, batch_size=4, generation=gen, pack=False)
    assert cap.packed and not plain.packed
    seeds = [5, 6, 7, 8]
    together = cap.caption(images, seeds=seeds)
    assert together == [cap.caption([im], seeds=[s])[0] for im, s in zip(images, seeds)]
    assert together == plain.caption(images, seeds=seeds)


def test_packing_by_default_follows_the_width_and_the_environment(our_captioner_dir, monkeypatch):
    from capfilt import inference
    from capfilt.model import packed

    if not packed.available():
        pytest.skip("this torch has no MKL packed matmul")
    monkeypatch.setattr(inference, "PACK_MIN_WIDTH", 16)  # the tiny test model is 32 wide
    assert Captioner(our_captioner_dir).packed
    assert not Captioner(our_captioner_dir, precision="fast").packed  # int8 layers are not packed
    monkeypatch.setenv(inference.PACKED_WEIGHTS_ENV, "0")
    assert not Captioner(our_captioner_dir).packed
    with pytest.raises(ValueError, match="pack=True is for exact mode on a CPU"):
        Captioner(our_captioner_dir, precision="fast", pack=True)


# ----------------------------------------------------------------------------- fast mode on a CPU


def _fast_scores_and_captions(monkeypatch, kind: str, filter_dir, captioner_dir, itc: bool = True):
    from capfilt import inference

    monkeypatch.setenv(inference.FAST_CPU_ENV, kind)
    images, texts = _images(3), [["a red circle"], ["two green squares", "a cat"], []]
    exact = Filter(filter_dir).score(images, texts)
    fast = Filter(filter_dir, precision="fast")
    for want, got in zip(exact, fast.score(images, texts)):
        assert len(got) == len(want)
        for w, g in zip(want, got):
            assert g.itm == pytest.approx(w.itm, abs=0.05)
            if itc:
                assert g.itc == pytest.approx(w.itc, abs=0.05)
    gen = GenerationConfig(method="greedy", max_tokens=6, min_tokens=2)
    captions = Captioner(captioner_dir, precision="fast", generation=gen).caption(images)
    assert [len(c) for c in captions] == [1, 1, 1] and all(isinstance(c[0], str) for c in captions)
    return fast


def _linears(module: torch.nn.Module) -> tuple[int, int]:
    """(plain fp32 Linears, int8 dynamically quantised Linears) in `module`."""
    quantised = torch.ao.nn.quantized.dynamic.Linear
    plain = sum(type(m) is torch.nn.Linear for m in module.modules())
    return plain, sum(isinstance(m, quantised) for m in module.modules())


def test_fast_mode_in_int8_keeps_a_narrow_text_side_in_fp32(our_filter_dir, our_captioner_dir, monkeypatch):
    """The tiny model's text side (32 wide) is under FAST_TEXT_MIN_WIDTH: only its image encoder
    is quantised."""
    fast = _fast_scores_and_captions(monkeypatch, "int8", our_filter_dir, our_captioner_dir)
    plain, quantised = _linears(fast.med.visual_encoder)
    assert plain == 0 and quantised > 0
    assert _linears(fast.med.text)[1] == 0 and type(fast.med.itm_head) is torch.nn.Linear
    assert fast.dtype == torch.float32


def test_fast_mode_in_int8_quantises_every_linear_of_a_wide_model(
    our_filter_dir, our_captioner_dir, monkeypatch
):
    from capfilt import inference

    monkeypatch.setattr(inference, "FAST_TEXT_MIN_WIDTH", 16)
    # The tiny random model's image [CLS] is ~1e-8, below int8's activation resolution: its ITC
    # image feature quantises to zero (a trained model's is of order 1), so ITC is not compared.
    fast = _fast_scores_and_captions(monkeypatch, "int8", our_filter_dir, our_captioner_dir, itc=False)
    plain, quantised = _linears(fast.med)
    assert plain == 0 and quantised > 10


def test_fast_mode_in_bf16_keeps_a_narrow_text_side_in_fp32(our_filter_dir, our_captioner_dir, monkeypatch):
    """Only the image encoder runs in bf16, and its image tokens reach the text side as fp32."""
    fast = _fast_scores_and_captions(monkeypatch, "bf16", our_filter_dir, our_captioner_dir)
    assert {p.dtype for p in fast.med.visual_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fast.med.text.parameters()} == {torch.float32}
    assert fast.dtype == torch.bfloat16  # the pixels the image encoder takes
    with torch.inference_mode():
        assert fast.med.encode_image(fast.pixels(_images(1))).dtype == torch.float32


def test_fast_mode_in_bf16_runs_a_wide_text_side_in_bf16(our_filter_dir, our_captioner_dir, monkeypatch):
    from capfilt import inference

    monkeypatch.setattr(inference, "FAST_TEXT_MIN_WIDTH", 16)
    fast = _fast_scores_and_captions(monkeypatch, "bf16", our_filter_dir, our_captioner_dir)
    assert {p.dtype for p in fast.med.parameters()} == {torch.bfloat16}


def test_fast_mode_on_a_gpu_takes_bf16_where_it_is_native_and_fp16_before(monkeypatch):
    from types import SimpleNamespace

    from capfilt import inference

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked = []
    for major, want in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):

        def properties(index, major=major):
            asked.append(index)
            return SimpleNamespace(major=major)

        monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
        assert inference.fast_dtype(torch.device("cuda")) == want
        assert inference.fast_dtype(torch.device("cuda", 1)) == want
    assert asked == [0, 1] * 3  # the current device, or the one named


def test_fast_mode_on_amd_takes_bf16_from_cdna_and_rdna3_on_and_fp16_before(monkeypatch):
    from types import SimpleNamespace

    from capfilt import inference

    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cases = {
        "gfx906:sramecc+:xnack-": torch.float16,  # MI50/MI60: bf16 emulated
        "gfx900": torch.float16,
        "gfx1030": torch.float16,  # RDNA 2
        "gfx908:sramecc+:xnack-": torch.bfloat16,  # MI100
        "gfx90a:sramecc+:xnack-": torch.bfloat16,  # MI200
        "gfx942:sramecc+:xnack-": torch.bfloat16,  # MI300
        "gfx1100": torch.bfloat16,  # RDNA 3
        "": torch.bfloat16,  # no name given: assume a current GPU
    }
    for arch, want in cases.items():
        # major 9 for every one: on ROCm the compute capability says nothing about bf16
        props = SimpleNamespace(major=9, gcnArchName=arch)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, props=props: props)
        assert inference.fast_dtype(torch.device("cuda")) == want, arch


def test_fast_mode_in_fp16_converts_the_whole_model_and_scores_as_exact_mode(
    our_filter_dir, our_captioner_dir, monkeypatch
):
    """What fast mode makes of a model for a GPU without bf16 (V100, T4), run here on the CPU:
    every weight in fp16, the caller's model left in fp32, scores near exact mode's, captions
    written."""
    from capfilt import inference

    monkeypatch.setattr(inference, "gpu_has_bf16", lambda device: False)
    gpu = torch.device("cuda")
    assert inference.fast_dtype(gpu) == torch.float16
    f = Filter(our_filter_dir)
    half = inference.fast_model(f.med, gpu)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert {p.dtype for p in f.med.parameters()} == {torch.float32}
    images, texts = _images(3), [["a red circle"], ["two green squares", "a cat"], []]
    exact = f.score(images, texts)
    f.med, f.dtype = half, torch.float16
    for want, got in zip(exact, f.score(images, texts)):
        assert len(got) == len(want)
        for w, g in zip(want, got):
            assert g.itm == pytest.approx(w.itm, abs=0.05)
            # The tiny random model's image [CLS] (~1e-8) is below fp16's range, so its ITC image
            # feature is zero here (a trained model's is of order 1); it must not be NaN.
            assert math.isfinite(g.itc)
    c = Captioner(our_captioner_dir, generation=GenerationConfig(method="greedy", max_tokens=6, min_tokens=2))
    c.med, c.dtype = inference.fast_model(c.med, gpu), torch.float16
    captions = c.caption(images)
    assert [len(x) for x in captions] == [1, 1, 1] and all(x[0].strip() for x in captions)


def test_fast_mode_on_a_cpu_follows_amx_unless_told(monkeypatch, our_filter_dir):
    from capfilt import inference

    monkeypatch.delenv(inference.FAST_CPU_ENV, raising=False)
    monkeypatch.setattr(inference, "cpu_has_amx", lambda: True)
    assert inference.fast_cpu_kind() == "bf16"
    monkeypatch.setattr(inference, "cpu_has_amx", lambda: False)
    assert inference.fast_cpu_kind() == "int8"
    assert inference.fast_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv(inference.FAST_CPU_ENV, " BF16 ")
    assert inference.fast_cpu_kind() == "bf16"
    monkeypatch.setenv(inference.FAST_CPU_ENV, "fp4")
    with pytest.raises(ValueError, match=r"CAPFILT_FAST_CPU='fp4': choose one of bf16, int8"):
        Filter(our_filter_dir, precision="fast")


def test_hosted_models_on_a_cpu_fix_the_malloc_thresholds_unless_told(our_filter_dir, monkeypatch):
    from capfilt import inference

    calls = []
    real = inference.tune_malloc
    monkeypatch.setattr(inference, "tune_malloc", lambda: calls.append(1) or True)
    inference.Filter(our_filter_dir)
    assert calls == [1]
    try:
        real.cache_clear()
        monkeypatch.setenv(inference.TUNE_MALLOC_ENV, "0")
        assert real() is False  # told to leave malloc alone
        real.cache_clear()
        monkeypatch.delenv(inference.TUNE_MALLOC_ENV)
        assert real() is (platform.libc_ver()[0] == "glibc")  # mallopt accepted both thresholds
    finally:
        real.cache_clear()
