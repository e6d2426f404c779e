"""Text in, text out, for every objective: prompts, continuations and infilling frames.

A request is (prefix ids, middle length, suffix ids). A diffusion objective fills the middle of the frame
[prefix | middle | suffix] with the prefix and suffix held clean; a plain prompt is a request with no suffix, an
unconditional sample one with no prefix either. The AR twin continues [BOS, prefix] by `middle length` tokens and
cannot use a suffix (its objective's `uses_suffix` is False: the suffix is ignored and reported as such).
Requests of equal frame length are batched together; the objective generates each batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dimba.config.schema import SamplingConfig
from dimba.objectives import Request, get_objective


@dataclass
class Result:
    request: Request
    middle: list[int]            # the generated tokens


@dataclass
class GenerationStats:
    tokens: int = 0              # generated tokens
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@torch.no_grad()
def generate(model, cfg, requests: list[Request], sampling: SamplingConfig, seed: int = 0, batch_size: int = 16,
             device="cpu", on_batch: Optional[Callable[[int], None]] = None,
             on_step: Optional[Callable[[int, int], None]] = None) -> tuple[list[Result], GenerationStats]:
    """Generate the middle of every request; results come back in request order. `on_batch(n)` is called after
    each batch of n requests, `on_step(i, n)` after each sampling step. One generator seeded with `seed` drives
    all randomness, so the same seed, requests and batch size give the same tokens."""
    objective = get_objective(cfg)
    generator = torch.Generator().manual_seed(seed)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].length, i))
    results: list[Optional[Result]] = [None] * len(requests)
    stats = GenerationStats()
    start = 0
    while start < len(order):
        length = requests[order[start]].length
        group = [i for i in order[start:start + batch_size] if requests[i].length == length]
        batch = [requests[i] for i in group]
        t0 = time.perf_counter()
        middles = objective.generate(model, batch, sampling, generator, device, on_step)
        stats.seconds += time.perf_counter() - t0
        for i, m in zip(group, middles):
            results[i] = Result(requests[i], m)
            stats.tokens += len(m)
        if on_batch is not None:
            on_batch(len(group))
        start += len(group)
    return results, stats


__all__ = ["GenerationStats", "Request", "Result", "generate"]
