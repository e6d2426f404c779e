"""Text in, text out, for both model kinds: prompts, continuations and infilling frames.

A request is (prefix ids, middle length, suffix ids). DIMBA fills the middle of the frame
[prefix | middle | suffix] in one diffusion pass with the prefix and suffix held clean; a plain prompt is a
request with no suffix, an unconditional sample one with no prefix either. The AR twin continues
[BOS, prefix] by `middle length` tokens and cannot use a suffix (it is ignored and reported as such).
Requests of equal frame length are batched together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dimba.config.schema import SamplingConfig
from dimba.data.tokenizer import BOS_ID
from dimba.diffusion.sampling import sample
from dimba.diffusion.schedule import NoiseSchedule


@dataclass
class Request:
    prefix: list[int]
    middle_length: int
    suffix: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prefix) + self.middle_length + len(self.suffix)


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


def schedule_for(cfg) -> NoiseSchedule:
    return NoiseSchedule.from_config(cfg.diffusion)


def frame(requests: list[Request], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(clean_tokens, clean) for requests of one frame length."""
    length = requests[0].length
    tokens = torch.zeros(len(requests), length, dtype=torch.long)
    clean = torch.zeros(len(requests), length, dtype=torch.bool)
    for i, r in enumerate(requests):
        tokens[i, :len(r.prefix)] = torch.tensor(r.prefix, dtype=torch.long)
        clean[i, :len(r.prefix)] = True
        if r.suffix:
            tokens[i, length - len(r.suffix):] = torch.tensor(r.suffix, dtype=torch.long)
            clean[i, length - len(r.suffix):] = True
    return tokens.to(device), clean.to(device)


@torch.no_grad()
def generate(model, cfg, requests: list[Request], sampling: SamplingConfig, seed: int = 0, batch_size: int = 16,
             device="cpu", on_batch: Optional[Callable[[int], None]] = None,
             on_step: Optional[Callable[[int, int], None]] = None) -> tuple[list[Result], GenerationStats]:
    """Generate the middle of every request; results come back in request order. `on_batch(n)` is called after
    each batch of n requests, `on_step(i, n)` after each sampling step. One generator seeded with `seed` drives
    all randomness, so the same seed, requests and batch size give the same tokens."""
    generator = torch.Generator().manual_seed(seed)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].length, i))
    results: list[Optional[Result]] = [None] * len(requests)
    stats = GenerationStats()
    schedule = schedule_for(cfg) if cfg.model.kind == "dimba" else None
    start = 0
    while start < len(order):
        length = requests[order[start]].length
        group = [i for i in order[start:start + batch_size] if requests[i].length == length]
        batch = [requests[i] for i in group]
        t0 = time.perf_counter()
        if cfg.model.kind == "ar":
            middles = _ar_batch(model, batch, sampling, generator, device)
        else:
            tokens, clean = frame(batch, device)
            out = sample(model, schedule, sampling, len(batch), length, tokens, clean, generator, device, on_step)
            middles = [out[k, len(r.prefix):len(r.prefix) + r.middle_length].tolist() for k, r in enumerate(batch)]
        stats.seconds += time.perf_counter() - t0
        for i, m in zip(group, middles):
            results[i] = Result(requests[i], m)
            stats.tokens += len(m)
        if on_batch is not None:
            on_batch(len(group))
        start += len(group)
    return results, stats


def _ar_batch(model, batch: list[Request], sampling: SamplingConfig, generator, device) -> list[list[int]]:
    """AR continuation of [BOS, prefix]; prefixes of unequal length are decoded in sub-batches of equal length."""
    out: dict[int, list[int]] = {}
    by_len: dict[int, list[int]] = {}
    for k, r in enumerate(batch):
        by_len.setdefault(len(r.prefix), []).append(k)
    for plen, ks in sorted(by_len.items()):
        prompt = torch.tensor([[BOS_ID] + batch[k].prefix for k in ks], dtype=torch.long, device=device)
        n = batch[ks[0]].middle_length
        gen = model.generate(prompt, n, sampling, generator)
        for row, k in enumerate(ks):
            out[k] = gen[row, plen + 1:].tolist()
    return [out[k] for k in range(len(batch))]
