"""Caption generation: KV-cached decoding against a no-cache loop, greedy and beam search against
transformers' `generate` on the same weights, and nucleus sampling's reproducibility guarantees."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from transformers import BlipTextConfig
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

from capfilt.model import generate as G
from capfilt.model import sampling as S
from capfilt.model.config import med_config
from capfilt.model.generate import GenerationConfig, _nucleus_chooser, generate
from capfilt.model.med import MED
from capfilt.model.sampling import (
    inverse_cdf,
    mask_top_k,
    mask_top_p,
    repetition_penalty,
    sample_among_top_k,
    sample_in_window,
)

TOKENS = dict(vocab_size=64, pad_token_id=0, cls_token_id=1, sep_token_id=2, dec_token_id=62, enc_token_id=63)
SEP, DEC = 2, 62
PROMPT = torch.tensor([DEC, 10, 11, 12])
P = PROMPT.numel()
Captions = list[list[list[int]]]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The model is tiny: extra threads only add overhead (and thrash on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_med(dropout: float = 0.0) -> MED:
    """A tiny MED whose decoder is peaky (large tied embeddings, wider random weights, so captions
    depend on the image) and likes [SEP] enough that some captions end early and others run to
    max_tokens."""
    torch.manual_seed(0)
    med = MED(med_config("tiny", dropout=dropout, **TOKENS)).eval()
    with torch.no_grad():
        for name, p in med.text.named_parameters():
            if p.dim() == 2 and "word_embeddings" not in name:
                p.normal_(0.0, 0.3)
        med.text.embeddings.word_embeddings.weight.mul_(30.0)  # tied with the LM head
        med.lm_head.bias[SEP] += 6.0
    return med


@pytest.fixture(scope="module")
def med() -> MED:
    return tiny_med()


@pytest.fixture(scope="module")
def images(med: MED) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return med.encode_image(torch.randn(6, 3, 32, 32))  # (6, 1 + 16, 32)


def lengths(captions: Captions) -> list[int]:
    return [len(c) for image in captions for c in image]


# ----------------------------------------------------------------------------- references


def reference_greedy(med: MED, image: torch.Tensor, config: GenerationConfig) -> list[int]:
    """Greedy decoding without a cache: recompute the whole sequence every step."""
    seq, out = PROMPT.tolist(), []
    with torch.no_grad():
        for t in range(config.max_tokens):
            logits = med.lm_logits(image, torch.tensor([seq]))[0, -1].clone()
            for token in set(seq):
                value = logits[token]
                pen = config.repetition_penalty
                logits[token] = value * pen if value < 0 else value / pen
            if t < config.min_tokens:
                logits[SEP] = -math.inf
            token = int(logits.argmax())
            if token == SEP:
                break
            out.append(token)
            seq.append(token)
    return out


def to_transformers(med: MED) -> BlipTextLMHeadModel:
    """transformers' BLIP text decoder holding our decoder's weights (renamed, nothing left out)."""
    t = med.config.text
    config = BlipTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        encoder_hidden_size=med.config.vision.width,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.depth,
        num_attention_heads=t.heads,
        max_position_embeddings=t.max_positions,
        layer_norm_eps=t.layer_norm_eps,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.dec_token_id,
        sep_token_id=t.sep_token_id,
        eos_token_id=t.sep_token_id,
    )
    hf = BlipTextLMHeadModel(config).eval()
    state = {}
    for name, tensor in med.state_dict().items():
        parts = name.split(".")
        if name.startswith("text.embeddings."):
            state["bert." + name[len("text.") :]] = tensor
        elif name.startswith("text.layer."):
            i, module, rest = parts[2], parts[3], ".".join(parts[4:])
            if module == "causal_attention":
                state[f"bert.encoder.layer.{i}.attention.{rest}"] = tensor
            elif module in ("crossattention", "intermediate", "output"):
                state[f"bert.encoder.layer.{i}.{module}.{rest}"] = tensor
        elif name.startswith("lm_head.transform."):
            state["cls.predictions." + name[len("lm_head.") :]] = tensor
        elif name == "lm_head.decoder.weight":
            state["cls.predictions.decoder.weight"] = tensor
        elif name == "lm_head.bias":
            state["cls.predictions.bias"] = state["cls.predictions.decoder.bias"] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("position_ids")], (
        missing,
        unexpected,
    )
    return hf


def transformers_generate(
    hf: BlipTextLMHeadModel, images: torch.Tensor, config: GenerationConfig
) -> Captions:
    B, K = images.shape[0], config.num_captions
    with torch.no_grad():
        out = hf.generate(
            input_ids=PROMPT.repeat(B, 1),
            attention_mask=torch.ones(B, P, dtype=torch.long),
            encoder_hidden_states=images,
            encoder_attention_mask=torch.ones(images.shape[:2], dtype=torch.long),
            eos_token_id=SEP,
            pad_token_id=0,
            max_length=P + config.max_tokens,
            min_new_tokens=config.min_tokens,
            num_beams=config.num_beams if config.method == "beam" else 1,
            num_return_sequences=K,
            do_sample=False,
            length_penalty=config.length_penalty,
            repetition_penalty=config.repetition_penalty,
        )
    rows = []
    for row in out[:, P:].tolist():
        rows.append(row[: row.index(SEP)] if SEP in row else row)  # HF pads after [SEP]
    return [rows[i * K : (i + 1) * K] for i in range(B)]


def beam_score(med: MED, image: torch.Tensor, caption: list[int], config: GenerationConfig) -> float:
    """transformers' finished-beam score: sum log-probs (the [SEP] included) / length ** penalty."""
    generated = [*caption, SEP] if len(caption) < config.max_tokens else caption
    seq = torch.tensor([PROMPT.tolist() + generated])
    with torch.no_grad():
        log_probs = med.lm_logits(image, seq)[0, P - 1 : -1].float().log_softmax(-1)  # (len, V)
    total = log_probs.gather(1, torch.tensor(generated)[:, None]).sum().item()
    return total / len(generated) ** config.length_penalty


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    ("min_tokens", "max_tokens", "repetition_penalty"),
    [(0, 15, 1.0), (5, 15, 1.0), (3, 12, 1.3), (4, 4, 1.0)],
)
def test_greedy_matches_no_cache_loop(
    med: MED, images: torch.Tensor, min_tokens: int, max_tokens: int, repetition_penalty: float
) -> None:
    config = GenerationConfig(
        method="greedy", min_tokens=min_tokens, max_tokens=max_tokens, repetition_penalty=repetition_penalty
    )
    batch = generate(med, images, PROMPT, config)
    expected = [[reference_greedy(med, images[i : i + 1], config)] for i in range(len(images))]
    assert batch == expected
    assert [generate(med, images[i : i + 1], PROMPT, config)[0] for i in range(len(images))] == batch
    assert all(min_tokens <= n <= max_tokens for n in lengths(batch))


def test_fixture_exercises_stopping(med: MED, images: torch.Tensor) -> None:
    free = lengths(
        generate(med, images, PROMPT, GenerationConfig(method="greedy", min_tokens=0, max_tokens=15))
    )
    assert 15 in free and min(free) < 5  # some captions run to max_tokens, some end early
    assert len({tuple(c[0]) for c in generate(med, images, PROMPT, GenerationConfig(method="greedy"))}) > 3
    held = lengths(
        generate(med, images, PROMPT, GenerationConfig(method="greedy", min_tokens=5, max_tokens=15))
    )
    assert min(held) >= 5 and held != free


def test_prompt_position_zero_is_dec(med: MED, images: torch.Tensor) -> None:
    # Position 0 becomes [DEC] whatever it held, so the repetition penalty sees [DEC] there too:
    # put a token the model likes at position 0 and a strong penalty would change the captions.
    config = GenerationConfig(method="greedy", repetition_penalty=3.0)
    expected = generate(med, images, PROMPT, config)
    liked = max(range(3, 62), key=lambda token: sum(c[0].count(token) for c in expected))
    other = PROMPT.clone()
    other[0] = liked
    assert generate(med, images, other, config) == expected


def test_generate_restores_training_mode() -> None:
    med = tiny_med(dropout=0.5)
    torch.manual_seed(1)
    images = med.encode_image(torch.randn(3, 3, 32, 32)).detach()
    config = GenerationConfig(method="greedy")
    expected = generate(med, images, PROMPT, config)
    med.train()
    med.visual_encoder.eval()  # a mixed state, e.g. a frozen image encoder, must survive too
    assert generate(med, images, PROMPT, config) == expected  # dropout off while generating
    assert med.training and med.text.training and not med.visual_encoder.training
    assert not any(m.training for m in med.visual_encoder.modules())
    assert all(p.grad is None for p in med.parameters())


# ----------------------------------------------------------------------------- beam search


@pytest.mark.parametrize(("min_tokens", "max_tokens"), [(0, 15), (5, 10)])
def test_one_beam_is_greedy(med: MED, images: torch.Tensor, min_tokens: int, max_tokens: int) -> None:
    beam = GenerationConfig(method="beam", num_beams=1, min_tokens=min_tokens, max_tokens=max_tokens)
    greedy = GenerationConfig(method="greedy", min_tokens=min_tokens, max_tokens=max_tokens)
    assert generate(med, images, PROMPT, beam) == generate(med, images, PROMPT, greedy)


TRANSFORMERS_CASES = [
    GenerationConfig(method="greedy", min_tokens=0, max_tokens=15),
    GenerationConfig(method="greedy", min_tokens=3, max_tokens=12, repetition_penalty=1.3),
    # transformers decodes greedily with one beam: the repetition penalty then acts on logits.
    GenerationConfig(method="beam", num_beams=1, min_tokens=4, max_tokens=15, repetition_penalty=1.5),
    GenerationConfig(method="beam", num_beams=3, num_captions=1, min_tokens=0, max_tokens=15),
    GenerationConfig(method="beam", num_beams=3, num_captions=3, min_tokens=5, max_tokens=15),
    GenerationConfig(
        method="beam", num_beams=3, num_captions=3, min_tokens=3, max_tokens=15, length_penalty=0.0
    ),
    GenerationConfig(
        method="beam", num_beams=3, num_captions=2, min_tokens=0, max_tokens=12, length_penalty=2.0
    ),
    GenerationConfig(
        method="beam", num_beams=4, num_captions=4, min_tokens=2, max_tokens=10, repetition_penalty=1.3
    ),
    GenerationConfig(
        method="beam", num_beams=2, num_captions=2, min_tokens=8, max_tokens=8, length_penalty=-1.0
    ),
]


@pytest.mark.parametrize(
    "config", TRANSFORMERS_CASES, ids=lambda c: f"{c.method}-{c.num_beams}-{c.num_captions}"
)
def test_matches_transformers(med: MED, images: torch.Tensor, config: GenerationConfig) -> None:
    ours = generate(med, images, PROMPT, config)
    assert ours == transformers_generate(to_transformers(med), images, config)
    assert [len(image) for image in ours] == [config.num_captions] * len(images)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beams_sorted_by_score(med: MED, images: torch.Tensor, length_penalty: float) -> None:
    config = GenerationConfig(
        method="beam", num_beams=3, num_captions=3, min_tokens=2, length_penalty=length_penalty
    )
    captions = generate(med, images, PROMPT, config)
    distinct = 0
    for i, beams in enumerate(captions):
        scores = [beam_score(med, images[i : i + 1], c, config) for c in beams]
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(scores)), scores
        distinct += len({tuple(c) for c in beams}) == 3
    assert distinct == len(images)


# ----------------------------------------------------------------------------- nucleus sampling

NUCLEUS = GenerationConfig(
    method="nucleus", num_captions=5, repetition_penalty=1.1, min_tokens=3, max_tokens=15
)
SEEDS = [100, 101, 102, 103, 104, 105]


def test_nucleus_reproducible_and_independent_of_batch(med: MED, images: torch.Tensor) -> None:
    captions = generate(med, images, PROMPT, NUCLEUS, seeds=SEEDS)
    assert generate(med, images, PROMPT, NUCLEUS, seeds=SEEDS) == captions
    default_seeds = GenerationConfig(**{**NUCLEUS.__dict__, "seed": 100})
    assert generate(med, images, PROMPT, default_seeds) == captions  # seed + image index
    reversed_ = generate(med, images.flip(0), PROMPT, NUCLEUS, seeds=SEEDS[::-1])
    assert reversed_[::-1] == captions
    for i in (0, 3):
        assert generate(med, images[i : i + 1], PROMPT, NUCLEUS, seeds=[SEEDS[i]]) == [captions[i]]
    fewer = GenerationConfig(**{**NUCLEUS.__dict__, "num_captions": 2})
    assert generate(med, images[2:4], PROMPT, fewer, seeds=SEEDS[2:4]) == [c[:2] for c in captions[2:4]]
    assert generate(med, images, PROMPT, NUCLEUS, seeds=[s + 50 for s in SEEDS]) != captions


@pytest.mark.parametrize(("check_every", "compact"), [(1, 0.5), (1, 1.0), (2, 0.0), (4, 0.5)])
def test_when_finished_rows_leave_changes_no_token(
    med: MED, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch, check_every: int, compact: float
) -> None:
    """Finished rows are looked for every few steps on a GPU (the host does not wait on the device
    every step), and leave the batch only once COMPACT_FRACTION of the rows have finished (1.0:
    never); the captions must be those of dropping each row the step it finishes."""
    greedy = GenerationConfig(method="greedy", min_tokens=0, max_tokens=15)  # some rows end early
    monkeypatch.setattr(G, "COMPACT_FRACTION", 0.0)
    expected = [generate(med, images, PROMPT, c, seeds=SEEDS) for c in (greedy, NUCLEUS)]
    assert len(set(lengths(expected[0]))) > 2  # rows finish at different steps
    decode = G._decode_rows
    monkeypatch.setattr(G, "_decode_rows", functools.partial(decode, check_every=check_every))
    monkeypatch.setattr(G, "COMPACT_FRACTION", compact)
    assert [generate(med, images, PROMPT, c, seeds=SEEDS) for c in (greedy, NUCLEUS)] == expected


def test_nucleus_samples_differ(med: MED, images: torch.Tensor) -> None:
    captions = generate(med, images, PROMPT, NUCLEUS, seeds=SEEDS)
    varied = sum(len({tuple(c) for c in samples}) > 1 for samples in captions)
    assert varied >= len(images) - 1


@pytest.mark.parametrize("min_tokens", [0, 5])
def test_nucleus_lengths(med: MED, images: torch.Tensor, min_tokens: int) -> None:
    config = GenerationConfig(**{**NUCLEUS.__dict__, "min_tokens": min_tokens, "max_tokens": 12})
    n = lengths(generate(med, images, PROMPT, config, seeds=SEEDS))
    assert min(n) >= min_tokens and max(n) == 12
    if min_tokens == 0:
        assert min(n) < 5  # so the min_tokens=5 case can fail


@pytest.mark.parametrize(("top_p", "temperature", "top_k"), [(1e-6, 1.0, 0), (1.0, 1e-3, 0), (1.0, 1.0, 1)])
def test_degenerate_nucleus_is_greedy(
    med: MED, images: torch.Tensor, top_p: float, temperature: float, top_k: int
) -> None:
    sample = GenerationConfig(
        **{**NUCLEUS.__dict__, "num_captions": 3, "top_p": top_p, "temperature": temperature, "top_k": top_k}
    )
    greedy = GenerationConfig(method="greedy", repetition_penalty=1.1, min_tokens=3, max_tokens=15)
    expected = generate(med, images, PROMPT, greedy)
    assert generate(med, images, PROMPT, sample, seeds=SEEDS) == [c * 3 for c in expected]


def test_repetition_penalty_reduces_repeats(med: MED, images: torch.Tensor) -> None:
    def repeats(penalty: float) -> int:
        config = GenerationConfig(**{**NUCLEUS.__dict__, "repetition_penalty": penalty, "min_tokens": 15})
        return sum(
            len(c) - len(set(c))
            for image in generate(med, images, PROMPT, config, seeds=SEEDS)
            for c in image
        )

    assert repeats(2.0) < repeats(1.0) / 2


def test_processors_match_transformers() -> None:
    torch.manual_seed(2)
    scores = torch.randn(8, 64) * 3
    seqs = torch.randint(0, 64, (8, 10))
    for penalty in (1.1, 0.7):
        ours = scores.clone()
        assert repetition_penalty(ours, seqs, penalty) is ours  # in place: a step's logits are its own
        assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(penalty)(seqs, scores.clone()))
    for top_p in (0.05, 0.5, 0.9, 1.0):
        assert torch.equal(mask_top_p(scores, top_p), TopPLogitsWarper(top_p)(seqs, scores))
    ties = torch.randint(-3, 3, (8, 64)).float()
    for k in (1, 5, 50, 63):
        for s in (scores, ties):
            assert torch.equal(mask_top_k(s, k), TopKLogitsWarper(k)(seqs, s))
    assert torch.equal(mask_top_k(scores, 0), scores) and torch.equal(mask_top_k(scores, 64), scores)


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties", "masked"])
def test_top_p_equals_transformers_on_a_real_vocabulary(kind: str) -> None:
    """The value-threshold nucleus equals TopPLogitsWarper token for token, also where equal
    values straddle the boundary (those rows take the argsort path) and with -inf entries."""
    torch.manual_seed(5)
    scores = {
        "flat": torch.randn(64, 4000) * 0.02,  # random weights: the nucleus is most of the vocabulary
        "peaked": torch.randn(64, 4000) * 4,
        "ties": torch.randint(-4, 4, (64, 4000)).float(),
        "masked": torch.randn(64, 4000).masked_fill(torch.rand(64, 4000) < 0.3, -math.inf),
    }[kind]
    seqs = torch.zeros(64, 1, dtype=torch.long)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(mask_top_p(scores, top_p), TopPLogitsWarper(top_p)(seqs, scores))


def test_sampler_draws_from_the_nucleus() -> None:
    torch.manual_seed(3)
    N, config = 40_000, GenerationConfig(top_p=0.8, temperature=0.7)
    scores = (torch.randn(1, 64) * 2).expand(N, -1)
    uniforms = torch.rand(N, 1, dtype=torch.float64)
    picked = _nucleus_chooser(uniforms, config)(scores, torch.arange(N), 0)
    frequency = torch.bincount(picked, minlength=64).double() / N
    expected = mask_top_p(scores[:1] / 0.7, 0.8).softmax(-1)[0].double()
    assert (expected > 0).sum() > 3  # a real nucleus, not just the top token
    assert torch.all(frequency[expected == 0] == 0)
    assert (frequency - expected).abs().max() < 0.01  # ~4 standard deviations at N = 40k


def test_sampler_draws_from_the_top_k_then_the_nucleus() -> None:
    """transformers' order: temperature, top-k, then top-p over what top-k kept. A flat tail that
    top-p alone would let in (label smoothing leaves one like it) is cut by top-k."""
    torch.manual_seed(4)
    N, config = 40_000, GenerationConfig(top_p=0.9, top_k=3)
    row = torch.full((1, 64), -2.0)
    row[0, :5] = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0])
    scores = row.expand(N, -1)
    picked = _nucleus_chooser(torch.rand(N, 1, dtype=torch.float64), config)(scores, torch.arange(N), 0)
    frequency = torch.bincount(picked, minlength=64).double() / N
    expected = mask_top_p(mask_top_k(row, 3), 0.9).softmax(-1)[0].double()
    assert (expected > 0).sum() == 3
    assert mask_top_p(row, 0.9).isfinite().sum() > 3  # top-p alone keeps more
    assert torch.all(frequency[expected == 0] == 0)
    assert (frequency - expected).abs().max() < 0.01


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties", "masked", "smoothed"])
def test_sampling_among_the_top_k_picks_the_whole_rows_token(kind: str) -> None:
    """The CPU shortcut (a top-k, no sort of the vocabulary) picks, with the same uniforms, the
    token that top-k + top-p masks over the whole row and its inverse CDF pick."""
    torch.manual_seed(6)
    R, V = 128, 30524
    smoothed = torch.full((R, V), -2.0)  # what label smoothing leaves: a flat tail under a few tokens
    smoothed[:, :8] = torch.randn(R, 8) * 2 + 8
    scores = {
        "flat": torch.randn(R, V) * 0.02,
        "peaked": torch.randn(R, V) * 4,
        "ties": torch.randint(-4, 4, (R, V)).float(),  # ties at the k-th value: the whole-row path
        "masked": torch.randn(R, V).masked_fill(torch.rand(R, V) < 0.3, -math.inf),
        "smoothed": smoothed[:, torch.randperm(V)],
    }[kind]
    u = torch.rand(R, 1, dtype=torch.float64)
    for k in (1, 5, 50):
        for top_p in (0.5, 0.9, 1.0):
            whole = inverse_cdf(mask_top_p(mask_top_k(scores, k), top_p).softmax(dim=-1), u)
            assert torch.equal(sample_among_top_k(scores, u, k, top_p), whole), (k, top_p)


@pytest.mark.parametrize("kind", ["flat", "peaked", "bf16", "ties", "masked"])
def test_sampling_in_a_window_picks_the_whole_rows_token(kind: str) -> None:
    """The GPU's way (the top k + `extra` candidates, no host sync) picks the whole row's token
    wherever it does not say the row spilled; rows with ties at the k-th value within the window
    (bf16 logits have them) are picked right, and rows whose ties fill the window are flagged."""
    torch.manual_seed(7)
    R, V = 128, 30524
    scores = {
        "flat": torch.randn(R, V) * 0.02,
        "peaked": torch.randn(R, V) * 4,
        "bf16": (torch.randn(R, V) * 2).bfloat16().float(),  # ties near the k-th value are common
        "ties": torch.randint(-4, 4, (R, V)).float(),  # thousands tie the k-th: every row spills
        "masked": torch.randn(R, V).masked_fill(torch.rand(R, V) < 0.3, -math.inf),
    }[kind]
    u = torch.rand(R, 1, dtype=torch.float64)
    tied_inside = compared = 0
    for k in (1, 5, 50):
        values = torch.topk(scores, k + 1, dim=-1).values
        tied_inside += int((values[:, k] == values[:, k - 1]).sum())
        top = mask_top_k(scores, k)
        for top_p in (0.5, 0.9, 1.0):
            nucleus = mask_top_p(top, top_p)
            whole = inverse_cdf(nucleus.softmax(dim=-1), u)
            picked, spilled = sample_in_window(scores, u, k, top_p, extra=16)
            # Where the nucleus's edge cuts through equal values, which of them stay is the sort's
            # order of ties, on the whole row as in the window: there any token top-k kept will do.
            lowest_kept = nucleus.masked_fill(nucleus.isinf(), math.inf).min(dim=-1, keepdim=True).values
            cut = ((top == lowest_kept) & nucleus.isinf()).any(dim=-1)
            sure = ~spilled & ~cut
            assert torch.equal(picked[sure], whole[sure]), (k, top_p)
            assert top.gather(1, picked[~spilled, None]).isfinite().all()
            if kind == "ties":
                assert bool(spilled.all())
            else:
                assert not bool(spilled.any())
            compared += int(sure.sum())
    if kind != "ties":
        assert compared > 0.8 * 9 * R  # the exact comparison covered most rows
    if kind == "bf16":
        assert tied_inside > 0  # the window really held ties


def test_windowed_sampling_gives_the_same_captions_and_decodes_again_when_ties_spill(
    med: MED, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate with the GPU's windowed top-k (forced here on the CPU) writes the captions of the
    whole-row masks; rows whose ties may run past the window are decoded again."""
    config = GenerationConfig(**{**NUCLEUS.__dict__, "top_k": 10})
    expected = generate(med, images, PROMPT, config, seeds=SEEDS)
    chooser = G._nucleus_chooser
    monkeypatch.setattr(
        G,
        "_nucleus_chooser",
        lambda u, c, windowed=None: chooser(u, c, windowed=True if windowed is None else windowed),
    )
    prefills = []
    prefill = G._prefill
    monkeypatch.setattr(G, "_prefill", lambda *a: prefills.append(1) or prefill(*a))
    monkeypatch.setattr(S, "TIE_WINDOW", 4)
    assert generate(med, images, PROMPT, config, seeds=SEEDS) == expected
    assert len(prefills) == 1  # random fp32 logits: no ties, no second decode
    monkeypatch.setattr(S, "TIE_WINDOW", 0)  # the k-th is the last candidate: every row "spills"
    assert generate(med, images, PROMPT, config, seeds=SEEDS) == expected
    assert len(prefills) == 3  # decoded again through whole-row masks


def _windowed(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Force the GPU's windowed sampling on the CPU; -> the rows each generate decodes again."""
    chooser = G._nucleus_chooser
    monkeypatch.setattr(
        G,
        "_nucleus_chooser",
        lambda u, c, windowed=None: chooser(u, c, windowed=True if windowed is None else windowed),
    )
    redone: list[list[int]] = []
    untrusted = S.Nucleus.untrusted
    monkeypatch.setattr(
        S.Nucleus, "untrusted", lambda self, last: redone.append(untrusted(self, last)) or redone[-1]
    )
    return redone


def test_rows_whose_ties_spill_are_decoded_again_alone_so_captions_do_not_depend_on_the_batch(
    med: MED, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coarse logits (as bf16 or fp16 make them, here rounded to steps of 2) tie by the dozen at the
    k-th value: some images' rows spill past the window and some don't. Only the spilled rows are
    decoded again, so each image's captions are the same alone and in any batch."""
    torch.manual_seed(1)
    with torch.no_grad():
        many = med.encode_image(torch.randn(12, 3, 32, 32))

    def coarse(logits: torch.Tensor) -> torch.Tensor:
        return (logits / 2.0).round() * 2.0

    step_call, prefill = G.DecodeStep.__call__, G._prefill
    monkeypatch.setattr(G.DecodeStep, "__call__", lambda self, t, c: coarse(step_call(self, t, c)))
    monkeypatch.setattr(G, "_prefill", lambda *a: (lambda lc: (coarse(lc[0]), lc[1]))(prefill(*a)))
    redone = _windowed(monkeypatch)
    config = GenerationConfig(method="nucleus", top_k=10, max_tokens=20, min_tokens=3)
    seeds = list(range(100, 112))
    alone = [generate(med, many[i : i + 1], PROMPT, config, seeds=[seeds[i]])[0] for i in range(12)]
    spilled_alone = [bool(r) for r in redone]
    assert 0 < sum(spilled_alone) < 12  # some images spill, some don't
    redone.clear()
    assert generate(med, many, PROMPT, config, seeds=seeds) == alone
    assert sorted(redone[0]) == [i for i in range(12) if spilled_alone[i]]  # those rows alone
    assert generate(med, many.flip(0), PROMPT, config, seeds=seeds[::-1]) == alone[::-1]


def test_a_spill_counts_only_up_to_the_rows_last_token() -> None:
    """A finished row is sampled on until finished rows leave the batch; ties after its [SEP]
    must not send it (and its image) to be decoded again."""
    nucleus = S.Nucleus(torch.rand(3, 6, dtype=torch.float64), top_k=2, top_p=0.9, windowed=True)
    scores = torch.randn(3, 40)
    scores[1, :5] = 10.0  # row 1: five tokens tie the 2nd best, more than the window of 2 + 0 holds
    S.TIE_WINDOW, window = 0, S.TIE_WINDOW
    try:
        for step in range(4):
            nucleus(scores, torch.arange(3), step)
    finally:
        S.TIE_WINDOW = window
    assert nucleus.untrusted([5, 5, 5]) == [0, 1, 2]  # TIE_WINDOW 0: every row's last candidate is the k-th
    nucleus = S.Nucleus(torch.rand(3, 6, dtype=torch.float64), top_k=2, top_p=0.9, windowed=True)
    for step in range(4):
        nucleus(scores, torch.arange(3), step)
    assert nucleus.untrusted([5, 5, 5]) == []  # the window (2 + 16) holds row 1's five ties
    nucleus(scores[1:2].index_fill(1, torch.arange(20), 10.0), torch.tensor([1]), 4)  # 20 ties at step 4
    assert nucleus.untrusted([5, 3, 5]) == []  # row 1 ended at step 3
    assert nucleus.untrusted([5, 4, 5]) == [1]


def test_fewer_finite_tokens_than_k_is_no_spill() -> None:
    scores = torch.full((2, 100), -math.inf)
    scores[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    scores[1, :1] = 0.5
    u = torch.tensor([[0.3], [0.9]], dtype=torch.float64)
    picked, spilled = sample_in_window(scores, u, 10, 0.9, extra=2)
    assert not bool(spilled.any())
    assert torch.equal(picked, inverse_cdf(mask_top_p(mask_top_k(scores, 10), 0.9).softmax(dim=-1), u))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"method": "topk"}, "method"),
        ({"num_captions": 0}, "num_captions"),
        ({"method": "greedy", "num_captions": 2}, "num_captions"),
        ({"method": "beam", "num_beams": 3, "num_captions": 4}, "num_captions"),
        ({"num_beams": 0}, "num_beams"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 31}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"length_penalty": math.nan}, "length_penalty"),
        ({"seed": -1}, "seed"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"max_tokens": 2.5}, "max_tokens"),
    ],
)
def test_validate_names_the_bad_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"GenerationConfig\.{field}="):
        GenerationConfig(**changes).validate()


def test_generate_rejects_bad_inputs(med: MED, images: torch.Tensor) -> None:
    GenerationConfig().validate()
    with pytest.raises(ValueError, match="max_tokens"):
        generate(med, images, PROMPT, GenerationConfig(max_tokens=62))  # 4 + 62 - 1 > 64 positions
    with pytest.raises(ValueError, match="seeds"):
        generate(med, images, PROMPT, GenerationConfig(), seeds=[1, 2])
    with pytest.raises(ValueError, match="top_p"):
        generate(med, images, PROMPT, GenerationConfig(top_p=2.0))


def test_sampler_at_the_top_of_the_cdf_picks_the_last_token_with_mass() -> None:
    """A uniform that rounds to the total mass must still pick a token in the nucleus."""
    config = GenerationConfig(top_p=0.5)
    scores = torch.tensor([[0.0, 3.0, -math.inf, 2.0, -1.0, -math.inf]])
    kept = mask_top_p(scores, 0.5)[0] > -math.inf
    picked = _nucleus_chooser(torch.ones(1, 1, dtype=torch.float64), config)(scores, torch.arange(1), 0)
    assert kept[picked].all()
    assert int(picked) == int(kept.nonzero().max())


# ----------------------------------------------------------------------------- decoding cache


def test_reserved_cache_steps_equal_concatenating_ones(med: MED, images: torch.Tensor) -> None:
    B = images.shape[0]
    prompt = PROMPT.expand(B, -1)
    with torch.inference_mode():
        grown, reserved = med.new_cache(), med.new_cache()
        med.lm_logits(images, prompt, cache=grown)
        med.lm_logits(images, prompt, cache=reserved)
        reserved.reserve(P + 4)
        tokens = torch.arange(7, 7 + B)[:, None]
        for step in range(3):
            a = med.lm_logits(None, tokens + step, cache=grown)
            b = med.lm_logits(None, tokens + step, cache=reserved)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            assert grown.length == reserved.length == P + step + 1
        kept = torch.tensor([4, 1])  # finished rows leave, the others keep their keys and values
        grown, reserved = grown.select(kept), reserved.select(kept)
        a = med.lm_logits(None, tokens[:2], cache=grown)
        b = med.lm_logits(None, tokens[:2], cache=reserved)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="holds 8 positions"):
            med.lm_logits(None, tokens[:2], cache=reserved)  # every reserved position is used


def test_one_query_attention_equals_sdpa() -> None:
    from capfilt.model.text import _attend_one

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    mask = torch.zeros(3, 1, 1, 5).masked_fill(torch.tensor([0, 0, 1, 1, 0], dtype=torch.bool), -1e30)
    for m in (None, mask):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(_attend_one(q, k, v, m), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the decoding step


def test_decode_step_computes_what_lm_logits_computes(med: MED, images: torch.Tensor) -> None:
    from capfilt.model import step as S

    B = images.shape[0]
    with torch.inference_mode():
        slow, fast = med.new_cache(), med.new_cache()
        med.lm_logits(images, PROMPT.expand(B, -1), cache=slow)
        med.lm_logits(images, PROMPT.expand(B, -1), cache=fast)
        fast.reserve(P + 3)  # as generate() runs it: the step writes its keys in place
        decode = S.DecodeStep(med)
        tokens = torch.arange(5, 5 + B)
        for t in range(3):
            expected = med.lm_logits(None, (tokens + t)[:, None], cache=slow)[:, -1]
            got = decode(tokens + t, fast)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
            assert fast.length == slow.length == P + t + 1


def test_decode_step_runs_a_quantised_decoder_through_its_own_linears(med: MED, images: torch.Tensor) -> None:
    import copy

    from capfilt.model.step import DecodeStep

    quantised = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(med), {torch.nn.Linear}, dtype=torch.qint8
    )
    B = images.shape[0]
    with torch.inference_mode():
        slow, fast = quantised.new_cache(), quantised.new_cache()
        quantised.lm_logits(images, PROMPT.expand(B, -1), cache=slow)
        quantised.lm_logits(images, PROMPT.expand(B, -1), cache=fast)
        tokens = torch.arange(5, 5 + B)
        expected = quantised.lm_logits(None, tokens[:, None], cache=slow)[:, -1]
        torch.testing.assert_close(DecodeStep(quantised)(tokens, fast), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["nucleus", "greedy", "beam"])
def test_a_med_without_a_decoder_is_refused_by_name(method: str) -> None:
    config = med_config("tiny", **TOKENS)
    config.has_decoder = False
    filter_only = MED(config).eval()
    images = filter_only.encode_image(torch.randn(2, 3, 32, 32)).detach()
    with pytest.raises(ValueError, match="no text decoder"):
        generate(filter_only, images, PROMPT, GenerationConfig(method=method, num_beams=2))


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("num_captions", 1_000_000, "num_captions=1000000: must be between 1 and 64"),
        ("num_beams", 100_000, "num_beams=100000: must be between 1 and 64"),
        ("num_captions", 0, "must be between 1 and 64"),
    ],
)
def test_caption_and_beam_counts_have_an_upper_bound(field, value, says) -> None:
    """Each caption and beam is a batch row with its own cache: a mistyped count allocated until
    the machine ran out of memory, then ended in a RuntimeError."""
    with pytest.raises(ValueError, match=says):
        GenerationConfig(method="beam" if field == "num_beams" else "nucleus", **{field: value}).validate()
