"""Clean masks for conditional training: which positions of a sequence are given (True) and never noised.

Each sequence draws one mode from the CleanMaskConfig mixture:
  none    all False (unconditional)
  prefix  the first k positions, k = floor(f * seq_len), f ~ U(prefix_frac)
  infill  a prefix (prefix_frac) and a suffix (suffix_frac) clean, the middle noisy;
          the suffix is shortened if needed so that at least one position stays noisy
  spans   n ~ U{span_count} clean spans holding floor(f * seq_len) positions in all,
          f ~ U(span_frac), placed at random with at least one noisy position between
          spans (n is lowered when the sequence is too short for that)
The loader seeds the generator from (data seed, split, the sample's global position),
so a sample's mask never depends on workers, ranks or resumption.
"""
from __future__ import annotations

import hashlib

import torch

from dimba.config.schema import CleanMaskConfig

MODES = ("none", "prefix", "infill", "spans")


def position_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _sorted_sample(population: int, k: int, generator: torch.Generator) -> list[int]:
    """k distinct integers from range(population), ascending."""
    return sorted(torch.randperm(population, generator=generator)[:k].tolist())


def _composition(total: int, parts: int, minimum: int, generator: torch.Generator) -> list[int]:
    """`parts` integers >= minimum summing to `total`, uniformly at random (stars and bars)."""
    free = total - parts * minimum
    cuts = _sorted_sample(free + parts - 1, parts - 1, generator)
    bounds = [-1] + cuts + [free + parts - 1]
    return [bounds[i + 1] - bounds[i] - 1 + minimum for i in range(parts)]


def draw_clean_mode(cfg: CleanMaskConfig, generator: torch.Generator) -> str:
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    acc = 0.0
    for mode in MODES:
        acc += getattr(cfg, mode)
        if u < acc:
            return mode
    return next(m for m in reversed(MODES) if getattr(cfg, m) > 0)   # u within rounding of 1.0


def draw_clean_mask(cfg: CleanMaskConfig, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """BoolTensor (seq_len,): True = clean (given) position; a deterministic function of the generator state."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mode = draw_clean_mode(cfg, generator)
    if mode == "prefix":
        mask[:int(_uniform(*cfg.prefix_frac, generator) * seq_len)] = True
    elif mode == "infill":
        k1 = int(_uniform(*cfg.prefix_frac, generator) * seq_len)
        k2 = min(int(_uniform(*cfg.suffix_frac, generator) * seq_len), seq_len - 1 - k1)
        mask[:k1] = True
        if k2 > 0:
            mask[seq_len - k2:] = True
    elif mode == "spans":
        clean = int(_uniform(*cfg.span_frac, generator) * seq_len)
        n = int(torch.randint(cfg.span_count[0], cfg.span_count[1] + 1, (), generator=generator))
        n = min(n, clean, seq_len - clean + 1)          # each span >= 1 position, >= 1 noisy between spans
        if n > 0:
            lengths = _composition(clean, n, 1, generator)
            gaps = _composition(seq_len - clean - (n - 1), n + 1, 0, generator)   # + 1 for inner gaps below
            pos = gaps[0]
            for i, length in enumerate(lengths):
                mask[pos:pos + length] = True
                pos += length + gaps[i + 1] + 1
    return mask
