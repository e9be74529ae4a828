"""Caption metrics: BLEU-4 and CIDEr-D as the COCO caption toolkit computes them, and attribute accuracy.

Both n-gram metrics follow pycocoevalcap (tylin/coco-caption `bleu_scorer.py`; vrama91/cider
`ciderD_scorer.py`) line for line, written here because the toolkit needs Java for its tokeniser.

Tokenisation stands in for the toolkit's Stanford PTBTokenizer (`-lowerCase`) followed by its
removal of punctuation tokens: lower-case; split the clitics 's 're 've 'll 'd 'm n't off their word
("isn't" -> "is n't", "dog's" -> "dog 's") and PTB's split words ("cannot" -> "can not", "gonna" ->
"gon na"); split $ % # off as tokens ("$5" -> "$ 5"); drop quotes and the marks . , ? ! : ; and
free-standing dashes or ellipses, except that a point, comma or colon between two digits stays
("3.5", "1,000"); hyphenated words stay whole ("black-and-white"). Brackets become PTB's escapes,
lower-cased: "(" -> "-lrb-", and so on. The toolkit keeps these as words, because PTBTokenizer
lower-cases after escaping and the toolkit's punctuation list has only the upper-case "-LRB-".
On plain captions this gives the same tokens as the toolkit; it differs only on rare PTB rules
(abbreviations such as "u.s." or "mr.", "'90s", URLs).

Inputs everywhere: `candidates[i]` is the one caption under test for image i, `references[i]` its
reference captions (at least one).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from capfilt.world import attribute_accuracy

NGRAM = 4  # BLEU-4 and CIDEr-D both use n = 1..4
CIDER_SIGMA = 6.0  # CIDEr-D's gaussian length penalty
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9  # pycocoevalcap's guards: an n-gram order with no match gives ~0

_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m", "n't")
_CLITIC = re.compile(r"(\w)(" + "|".join(_CLITICS) + r")\b")
# a point, comma or colon is punctuation unless it sits between two digits
_PUNCT = re.compile(r"[?!;\"`]|(?<!\d)[.,:]|[.,:](?!\d)")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET = re.compile(r"[()\[\]{}]")
_SYMBOL = re.compile(r"([$%#])")
_SPLIT_WORDS = {  # PTB's two-token words
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
_DASHES = re.compile(r"^[-.']+$")

Ngrams = Counter[tuple[str, ...]]


def tokenize(text: str) -> list[str]:
    """Lower-cased words with punctuation removed, as the COCO toolkit's PTB tokeniser leaves them."""
    text = _PUNCT.sub(" ", _CLITIC.sub(r"\1 \2", text.lower()))
    text = _SYMBOL.sub(r" \1 ", _BRACKET.sub(lambda m: f" {_BRACKETS[m.group()]} ", text))
    words = []
    for word in text.split():
        if word not in _CLITICS:
            word = word.strip("'")  # quotes around a word; clitics keep their apostrophe
        if word and not _DASHES.match(word):
            words.extend(_SPLIT_WORDS.get(word, (word,)))
    return words


def _ngrams(words: Sequence[str], n: int = NGRAM) -> Ngrams:
    """Counts of every 1..n-gram of a token list (pycocoevalcap's `precook`)."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidate captions but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise ValueError(f"every caption needs at least one reference; none for items {empty[:5]}")


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1], as pycocoevalcap's `Bleu(4)` (its `compute_score(option='closest')`).

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus before the
    geometric mean of the four precisions; the brevity penalty exp(1 - r/c) applies when the total
    candidate length c is below r, the sum over images of the reference length closest to each
    candidate's (ties go to the shorter reference).
    """
    _check(candidates, references)
    correct, guess = [0] * NGRAM, [0] * NGRAM
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        words = tokenize(cand)
        ref_words = [tokenize(r) for r in refs]
        max_ref: Ngrams = Counter()
        for rw in ref_words:
            max_ref |= _ngrams(rw)  # union keeps each n-gram's largest count in any one reference
        for gram, count in _ngrams(words).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(NGRAM):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    log_precision = sum(math.log((correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)) for k in range(NGRAM))
    score = math.exp(log_precision / NGRAM)
    ratio = (test_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


def _tfidf(
    grams: Ngrams, doc_freq: Counter[tuple[str, ...]], log_n: float
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """CIDEr-D's per-order tf-idf vectors, their norms, and the length used by the penalty.

    The length is the number of bigrams, as in the toolkit (`if n == 1: length += term_freq`);
    length differences then equal word-count differences except against an empty caption, whose
    cosine is 0 anyway.
    """
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(NGRAM)]
    for gram, tf in grams.items():
        vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
    length = sum(tf for gram, tf in grams.items() if len(gram) == 2)
    return vec, norms, length


def cider_d_per_image(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """CIDEr-D of each candidate (pycocoevalcap's `Cider`, df over the evaluated references).

    Per n-gram order: cosine of tf-idf vectors with the candidate's weights clipped by the
    reference's, times exp(-(l_c - l_r)^2 / (2 sigma^2)); averaged over the orders n = 1..4 and the
    references, times 10. Document frequencies count, for each n-gram, the images whose references
    hold it; idf = log(images) - log(max(1, df)). A one-image set therefore scores 0.
    """
    _check(candidates, references)
    cand_grams = [_ngrams(tokenize(c)) for c in candidates]
    ref_grams = [[_ngrams(tokenize(r)) for r in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_grams:
        doc_freq.update({gram for grams in refs for gram in grams})
    log_n = math.log(len(candidates))

    scores = []
    for grams, refs in zip(cand_grams, ref_grams):
        vec, norm, length = _tfidf(grams, doc_freq, log_n)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, length_r = _tfidf(ref, doc_freq, log_n)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(NGRAM):
                dot = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_r[n] != 0:
                    dot /= norm[n] * norm_r[n]
                total += dot * penalty
        scores.append(10.0 * total / NGRAM / len(refs))
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_per_image` (0 to 10; COCO models score about 1.0-1.4)."""
    scores = cider_d_per_image(candidates, references)
    return sum(scores) / len(scores)


def attribute_accuracy_mean(captions: Sequence[str], contents: Sequence[Mapping[str, Any] | str]) -> float:
    """Mean of the world's `attribute_accuracy` over captions; `contents` are scene dicts or the JSON
    strings of truth.parquet's `content` column."""
    if len(captions) != len(contents):
        raise ValueError(f"got {len(captions)} captions but {len(contents)} scene contents")
    if not captions:
        raise ValueError("no captions to score")
    total = 0.0
    for caption, content in zip(captions, contents):
        scene = json.loads(content) if isinstance(content, str) else dict(content)
        total += attribute_accuracy(caption, scene)
    return total / len(captions)


def caption_metrics(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    contents: Sequence[Mapping[str, Any] | str] | None = None,
) -> dict[str, float]:
    """BLEU-4, CIDEr-D and, given the scenes, attribute accuracy of one caption per image."""
    out = {"bleu4": bleu4(candidates, references), "cider_d": cider_d(candidates, references)}
    if contents is not None:
        out["attribute_accuracy"] = attribute_accuracy_mean(candidates, contents)
    return out
