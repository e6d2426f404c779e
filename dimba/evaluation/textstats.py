"""Diversity and repetition of generated token sequences (no model needed).

All statistics are on token ids of the model's own tokenizer:
  unigram_entropy_bits  Shannon entropy (bits) of the token frequency distribution pooled over all sequences;
                        a collapsed sampler (few tokens repeated) scores low, real text of this tokenizer scores
                        around 8-10 bits for a 4k-8k vocabulary.
  distinct_n            unique n-grams / all n-grams, pooled over all sequences (Li et al. 2016).
  repetition_rate       seq-rep-4 (Welleck et al. 2019): 1 - unique 4-grams / all 4-grams within one sequence,
                        averaged over sequences. 0: no 4-gram repeats inside a sample.
  rep_adjacent          fraction of tokens equal to the token right before them ("the the the").
Sequences shorter than n contribute no n-grams; a statistic with nothing to count is 0.0.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

REPETITION_N = 4


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def unigram_entropy(seqs: Sequence[Sequence[int]]) -> float:
    """Entropy in bits of the pooled token distribution."""
    counts = Counter(t for s in seqs for t in s)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over the sequences."""
    grams = [g for s in seqs for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(seqs: Sequence[Sequence[int]], n: int = REPETITION_N) -> float:
    """seq-rep-n: mean over sequences of 1 - unique n-grams / n-grams inside the sequence."""
    rates = []
    for s in seqs:
        grams = _ngrams(s, n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def adjacent_repetition(seqs: Sequence[Sequence[int]]) -> float:
    """Fraction of tokens (after the first of each sequence) equal to their predecessor."""
    same = sum(int(a == b) for s in seqs for a, b in zip(s[:-1], s[1:]))
    pairs = sum(max(len(s) - 1, 0) for s in seqs)
    return same / pairs if pairs else 0.0


def text_stats(seqs: Sequence[Sequence[int]]) -> dict[str, float]:
    """Every statistic above for a set of token sequences (lists of ints)."""
    seqs = [list(map(int, s)) for s in seqs]
    out = {"unigram_entropy_bits": unigram_entropy(seqs)}
    for n in (1, 2, 3, 4):
        out[f"distinct_{n}"] = distinct_n(seqs, n)
    out["repetition_rate"] = repetition_rate(seqs)
    out["rep_adjacent"] = adjacent_repetition(seqs)
    return out
