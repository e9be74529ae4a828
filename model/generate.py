"""Caption generation with the MED's image-grounded decoder: greedy, beam search, nucleus sampling.

Greedy and beam search follow transformers' `generate` step by step (same logits processors in the
same order, same beam bookkeeping), so identical weights give token-identical captions. Nucleus
sampling gives every (image, sample) row its own random stream seeded from (image seed, sample
index), so a caption never depends on which images share its batch (the token choices: `sampling`).

All three reuse one KV cache: the prompt and the image's cross-attention keys/values are computed
once per image, then repeated for the rows (samples or beams) of that image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .med import MED
from .sampling import Nucleus, repetition_penalty, row_uniforms
from .step import DecodeStep
from .text import KVCache

Method = Literal["greedy", "beam", "nucleus"]
METHODS = ("greedy", "beam", "nucleus")
_NEG = -1.0e9  # transformers' "impossible" beam score
# Finished rows leave the batch once they are at least this fraction of the running rows: dropping
# them copies every running row's cache, so doing it whenever one row finishes cost more than the
# finished rows' steps. The shipped small captioner, 128 images on 2 cores: 92.9 -> 87.6 ms; with a
# spread of caption lengths, 113 -> 91 (0.25: 90; 1.0, never: 123). Tokens identical.
COMPACT_FRACTION = 0.5
# Upper bounds: each caption and beam is a row of the batch with its own cached keys and values,
# so a mistyped 1000000 would allocate until the machine runs out of memory.
MAX_CAPTIONS = 64
MAX_BEAMS = 64


@dataclass
class GenerationConfig:
    method: Method = "nucleus"
    num_captions: int = 1  # K: nucleus samples per image; beam: best beams returned (<= num_beams); greedy: 1
    num_beams: int = 3
    top_p: float = 0.9  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    # nucleus: keep only the top_k most likely tokens first (0: off). BLIP samples through
    # transformers' `generate` without naming top_k, so transformers' default of 50 applies there.
    top_k: int = 0
    temperature: float = 1.0  # nucleus only, as in transformers (ignored when not sampling)
    repetition_penalty: float = 1.0  # BLIP's CapFilt sampling uses 1.1 (the caller sets it)
    max_tokens: int = 30  # generated tokens after the prompt, the final [SEP] included
    min_tokens: int = 5  # no [SEP] before this many tokens have been generated
    length_penalty: float = 1.0  # beam search: finished score = sum logprob / generated_len ** this
    seed: int = 0  # nucleus: image i uses seed + i unless `generate` gets explicit seeds

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"GenerationConfig.{name}={getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"choose one of {', '.join(METHODS)}")
        for name in ("num_captions", "num_beams", "max_tokens", "min_tokens", "seed", "top_k"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise bad(name, "must be an integer")
        for name in ("top_p", "temperature", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not 1 <= self.num_captions <= MAX_CAPTIONS:
            raise bad("num_captions", f"must be between 1 and {MAX_CAPTIONS}")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise bad("num_beams", f"must be between 1 and {MAX_BEAMS}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 means no top-k cut)")
        if self.temperature <= 0.0:
            raise bad("temperature", "must be > 0 (use method='greedy' for deterministic captions)")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be > 0 (1.0 means no penalty)")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be between 0 and max_tokens={self.max_tokens}")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        if self.method == "greedy" and self.num_captions != 1:
            raise bad("num_captions", "greedy decoding gives one caption per image; use 1")
        if self.method == "beam" and self.num_captions > self.num_beams:
            raise bad("num_captions", f"beam search returns at most num_beams={self.num_beams} captions")


def generate(
    med: MED,
    image_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    config: GenerationConfig,
    seeds: Sequence[int] | None = None,
) -> list[list[list[int]]]:
    """Captions for a batch of images.

    image_embeds (B, 1 + N, Dv) from `med.encode_image`; prompt_ids (P,): any token at position 0
    (it becomes [DEC]), then the prompt tokens, no [SEP]. `seeds`: one per image for nucleus
    sampling (default `config.seed + i`). Returns, per image, `config.num_captions` lists of the
    generated token ids only: prompt excluded, cut before [SEP].
    """
    config.validate()
    text = med.config.text
    B = image_embeds.shape[0]
    if prompt_ids.dim() != 1 or prompt_ids.numel() < 1:
        raise ValueError(
            f"prompt_ids must be a 1-D tensor holding at least [DEC], got shape {tuple(prompt_ids.shape)}"
        )
    P = prompt_ids.numel()
    if P + config.max_tokens - 1 > text.max_positions:
        raise ValueError(
            f"GenerationConfig.max_tokens={config.max_tokens}: prompt ({P} tokens) + max_tokens - 1 exceeds "
            f"the decoder's {text.max_positions} positions; lower max_tokens"
        )
    seeds = [config.seed + i for i in range(B)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != B:
        raise ValueError(f"seeds must hold one integer per image: got {len(seeds)} seeds for {B} images")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative, got {min(seeds)}")
    if B == 0:
        return []

    modes = [(module, module.training) for module in med.modules()]
    med.eval()  # dropout off; every module's own mode is restored below
    try:
        with torch.inference_mode():
            prompt = prompt_ids.to(image_embeds.device, torch.long).clone()
            prompt[0] = text.dec_token_id  # what the decoder sees, so what repetition penalty sees
            # transformers decodes greedily when num_beams == 1; so do we (with a repetition
            # penalty the two differ: beam search penalises log-probs, greedy penalises logits).
            if config.method == "beam" and config.num_beams > 1:
                logits, cache = _prefill(med, image_embeds, prompt, config.num_beams)
                return _beam_search(DecodeStep(med), logits, cache, prompt, config, text.sep_token_id)
            K = config.num_captions
            logits, cache = _prefill(med, image_embeds, prompt, K)  # refuses a MED without a decoder
            step = DecodeStep(med)
            cache.reserve(P + config.max_tokens)  # each step writes its keys and values in place
            if config.method != "nucleus":
                choose = _argmax
            else:
                uniforms = row_uniforms(seeds, K, config.max_tokens).to(image_embeds.device)
                choose = _nucleus_chooser(uniforms, config)
            rows = _decode_rows(step, logits, cache, prompt, config, text.sep_token_id, choose)
            if isinstance(choose, Nucleus):  # rows whose ties ran past the window: decode them again
                last_steps = [min(len(r), config.max_tokens - 1) for r in rows]
                redo = sorted({r // K for r in choose.untrusted(last_steps)})
                if redo:
                    index = torch.tensor(redo, device=image_embeds.device)
                    logits, cache = _prefill(med, image_embeds.index_select(0, index), prompt, K)
                    cache.reserve(P + config.max_tokens)
                    again = uniforms.view(B, K, -1).index_select(0, index).flatten(0, 1)
                    choose = _nucleus_chooser(again, config, windowed=False)
                    fixed = _decode_rows(step, logits, cache, prompt, config, text.sep_token_id, choose)
                    for j, i in enumerate(redo):
                        rows[i * K : (i + 1) * K] = fixed[j * K : (j + 1) * K]
            return [rows[i * K : (i + 1) * K] for i in range(B)]
    finally:
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------- model steps


def _prefill(
    med: MED, image_embeds: torch.Tensor, prompt: torch.Tensor, rows: int
) -> tuple[torch.Tensor, KVCache]:
    """Run the prompt once per image, then repeat logits and cache `rows` times per image.

    Returns next-token logits (B * rows, V) float32 and the cache for those rows (image-major).
    """
    B = image_embeds.shape[0]
    cache = med.new_cache()
    last = med.lm_logits(image_embeds, prompt.expand(B, -1), cache=cache, keep=slice(-1, None))
    logits = last[:, 0].float()  # (B, V) after the prompt's last token
    if rows > 1:
        repeat = torch.arange(B, device=logits.device).repeat_interleave(rows)  # (B * rows,)
        logits, cache = logits[repeat], cache.select(repeat)
    return logits, cache


# ----------------------------------------------------------------------------- logits processors
# transformers' RepetitionPenalty, MinNewTokensLength, Temperature, TopK and TopP, in its order:
# the first two here, the sampling ones in `sampling`.


def _process(
    scores: torch.Tensor, seqs: torch.Tensor, generated: int, config: GenerationConfig, sep: int
) -> torch.Tensor:
    """Repetition penalty, then no [SEP] before `min_tokens` generated tokens. Changes `scores`
    in place (a step's fresh logits: a (R, V) copy costs as much as the rest of the processing)."""
    scores = repetition_penalty(scores, seqs, config.repetition_penalty)
    if generated < config.min_tokens:
        scores[:, sep] = -math.inf
    return scores


# ----------------------------------------------------------------------------- greedy and nucleus

Chooser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _argmax(scores: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
    return scores.argmax(dim=-1)


def _nucleus_chooser(
    uniforms: torch.Tensor, config: GenerationConfig, windowed: bool | None = None
) -> Nucleus:
    return Nucleus(uniforms, config.top_k, config.top_p, config.temperature, windowed)


def _decode_rows(
    step: DecodeStep,
    logits: torch.Tensor,
    cache: KVCache,
    prompt: torch.Tensor,
    config: GenerationConfig,
    sep: int,
    choose: Chooser,
    check_every: int | None = None,
) -> list[list[int]]:
    """One token per row per step until [SEP] or max_tokens (transformers' `_sample`).

    logits (R, V) after the prompt. Finished rows leave the batch (their cache rows are dropped),
    so they cost nothing and cannot influence the others. -> R lists of generated ids, [SEP] cut.
    """
    R = logits.shape[0]
    out = torch.full((R, config.max_tokens), sep, dtype=torch.long, device=logits.device)
    active = torch.arange(R, device=logits.device)  # original row of each running row
    seqs = prompt.expand(R, -1)  # (R_active, P + t): the running rows' tokens so far
    finished = torch.zeros(R, dtype=torch.bool, device=logits.device)  # running rows that chose [SEP]
    # Asking the device whether rows finished makes the host wait for it. On a CPU that costs
    # nothing; on a GPU the host checks every few steps so that it can queue the next steps'
    # kernels while the device runs. A finished row that runs on (until then, and until
    # COMPACT_FRACTION of the rows have finished) writes tokens after its [SEP], which `_cut`
    # drops; rows never interact, so the others' tokens are unchanged.
    if check_every is None:
        check_every = 1 if logits.device.type == "cpu" else 4
    for t in range(config.max_tokens):
        scores = _process(logits, seqs, t, config, sep)
        tokens = choose(scores, active, t)  # (R_active,)
        out[active, t] = torch.where(finished, sep, tokens)
        finished = finished | (tokens == sep)
        if t == config.max_tokens - 1:
            break
        if (t + 1) % check_every == 0:
            done = int(finished.sum())
            if done == finished.shape[0]:
                break
            if done and done >= COMPACT_FRACTION * finished.shape[0]:
                keep = (~finished).nonzero().squeeze(1)
                active, tokens, seqs, cache = active[keep], tokens[keep], seqs[keep], cache.select(keep)
                finished = finished[keep]
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)
        logits = step(tokens, cache)
    return [_cut(row, sep) for row in out.tolist()]


def _cut(tokens: list[int], sep: int) -> list[int]:
    return tokens[: tokens.index(sep)] if sep in tokens else tokens


# ----------------------------------------------------------------------------- beam search


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, n, ...) gathered along dim 1 by index (B, m) -> (B, m, ...) (transformers' `_gather_beams`)."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


def _beam_search(
    step: DecodeStep,
    logits: torch.Tensor,
    cache: KVCache,
    prompt: torch.Tensor,
    config: GenerationConfig,
    sep: int,
) -> list[list[list[int]]]:
    """transformers' `_beam_search` with early_stopping=False, one [SEP] eos, no sampling.

    logits (B * nb, V) after the prompt, image-major. Each step keeps the 2 * nb best continuations
    over all beams; those among the top nb that end ([SEP] or max length) compete for the nb
    finished slots with score sum_logprobs / generated_len ** length_penalty, the best nb
    unfinished continue. Returns the num_captions best finished beams per image, best first.
    """
    nb, P, V = config.num_beams, prompt.numel(), logits.shape[1]
    B = logits.shape[0] // nb
    max_len = P + config.max_tokens
    keep = 2 * nb  # enough that nb beams survive even if the top nb all end
    device = logits.device

    running = torch.full((B, nb, max_len), sep, dtype=torch.long, device=device)  # tokens of live beams
    running[:, :, :P] = prompt
    finished = running.clone()  # tokens of the best finished hypotheses
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = _NEG  # the first step expands beam 0 only (all beams are equal then)
    finished_scores = torch.full((B, nb), _NEG, device=device)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(
        B, 1, dtype=torch.bool, device=device
    )  # can a live beam still beat a finished one?
    top_nb = torch.arange(keep, device=device) < nb  # only candidates ranked in the top nb may finish
    batch_offset = torch.arange(B, device=device)[:, None] * nb

    for cur_len in range(P, max_len):
        generated = cur_len - P
        log_probs = F.log_softmax(logits, dim=-1)  # processors act on log-probs, as in transformers
        log_probs = _process(
            log_probs, running[:, :, :cur_len].reshape(B * nb, cur_len), generated, config, sep
        )
        log_probs = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)

        # Top 2 * nb continuations over all beams of an image.
        top_scores, top_index = torch.topk(log_probs, k=keep)  # (B, keep)
        parent, token = top_index // V, top_index % V
        candidates = _take(running, parent)  # (B, keep, max_len)
        candidates[:, :, cur_len] = token
        ends = (token == sep) | (cur_len + 1 >= max_len)

        # Live beams for the next step: the best nb candidates that did not end.
        live_scores = top_scores + ends.to(torch.float32) * _NEG
        pick = torch.topk(live_scores, k=nb)[1]
        running, running_scores = _take(candidates, pick), _take(live_scores, pick)
        rows = (_take(parent, pick) + batch_offset).flatten()  # cache row each live beam extends

        # Finished hypotheses: merge the new ones into the nb best so far.
        just_finished = ends & top_nb[None, :]
        scores = top_scores / ((generated + 1) ** config.length_penalty)
        scores = scores + (~improvable).to(torch.float32) * _NEG
        scores = scores + (~just_finished) * _NEG
        best = torch.topk(torch.cat([finished_scores, scores], dim=1), k=nb)[1]
        finished = _take(torch.cat([finished, candidates], dim=1), best)
        finished_scores = _take(torch.cat([finished_scores, scores], dim=1), best)
        is_finished = _take(torch.cat([is_finished, just_finished], dim=1), best)

        # Early-stop heuristic (early_stopping=False): the best live beam, scored at its current
        # length, must beat the worst finished hypothesis for the image to keep searching.
        best_live = running_scores[:, :1] / ((generated + 1) ** config.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & (best_live > worst_finished).any(dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()):
            break
        cache = cache.select(rows)
        logits = step(running[:, :, cur_len].flatten(), cache)

    K = config.num_captions
    out = finished[:, :K, P:].tolist()  # (B, K, max_tokens), best first
    return [[_cut(row, sep) for row in image] for image in out]
