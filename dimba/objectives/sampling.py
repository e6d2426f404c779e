"""Logits -> tokens, shared by every objective's sampler: temperature, top-k, top-p, then an inverse-CDF draw in
float64 from one uniform per position (so a seed gives the same tokens on any device)."""
from __future__ import annotations

from typing import Optional

import torch

from dimba.config.schema import SamplingConfig


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then keep the top_k largest (0: all), then the smallest set whose probability reaches top_p
    (the most likely token is always kept). Removed entries become -inf."""
    logits = logits / temperature
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator] = None,
                uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final logits (B, L, V) -> tokens (B, L): argmax when `greedy`, else a draw from the filtered softmax.

    The draw runs where the logits are (a GPU does not ship B x L x V probabilities to the host), in float64
    (float32 cumulative sums over a large vocabulary lose the tail's mass, which lowers the effective temperature
    and flatters gen-PPL): inverse-CDF sampling with one uniform per position, `uniforms` (B, L) or drawn here from the CPU `generator`, so a seed
    gives the same tokens on any device (up to the rounding of the cumulative sums)."""
    if cfg.greedy:
        return logits.argmax(-1)
    if uniforms is None:
        if generator is None:
            raise ValueError("pick_tokens needs a generator or uniforms to draw from")
        uniforms = torch.rand(logits.shape[:-1], generator=generator, dtype=torch.float64)
    probs = filter_logits(logits.double(), cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:]
    # first index whose cdf exceeds u * total: a zero-probability token spans an empty interval and never comes
    # out; the target is kept below the total, which rounding of u * total could otherwise reach
    target = torch.minimum(uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)
