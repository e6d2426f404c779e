"""Conditioning: noise level and prompt -> one vector c per sample; c -> per-block modulation.

FiLM / adaLN-Zero (DiT): c gives (shift, scale, gate) for each block, all zero-initialised, so a fresh block
computes x + 0 * mixer(norm(x)) = x (the identity) and conditioning is learned from there.
Additive: c gives (shift, gate) only; the normalised input is shifted, not scaled.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style features of t (B,) scaled to [0, 1000] -> (B, dim), as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP -> (B, d_cond)."""

    def __init__(self, d_cond: int, d_freq: int = 256):
        super().__init__()
        self.d_freq = d_freq
        self.mlp = nn.Sequential(nn.Linear(d_freq, d_cond), nn.SiLU(), nn.Linear(d_cond, d_cond))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.d_freq).to(self.mlp[0].weight.dtype))


class PromptEncoder(nn.Module):
    """Pooled summary of the clean (given) tokens: masked mean of their embeddings -> MLP -> (B, d_cond).

    Lightweight on purpose: the clean tokens also enter the denoiser at their positions, so the sequence model
    sees them in full; the pooled vector gives every block a global view of the prompt through its modulation.
    A sample with no clean token gets a learned "no prompt" vector.
    """

    def __init__(self, d_embed: int, d_cond: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_embed, d_cond), nn.SiLU(), nn.Linear(d_cond, d_cond))
        self.null = nn.Parameter(torch.zeros(d_cond))

    def forward(self, x0: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        w = clean.to(x0.dtype).unsqueeze(-1)
        count = w.sum(1)
        pooled = (x0 * w).sum(1) / count.clamp_min(1.0)
        has = (count > 0).to(x0.dtype)
        return has * self.mlp(pooled) + (1 - has) * self.null


class Modulation(nn.Module):
    """c -> (shift, scale, gate) for FiLM or (shift, gate) for additive; zero-initialised."""

    def __init__(self, d_cond: int, d_model: int, mode: str):
        super().__init__()
        if mode not in ("film", "additive"):
            raise ValueError(f"unknown conditioning {mode!r}; use 'film' or 'additive'")
        self.mode = mode
        # parameters created as zeros (not zeroed after the fact) so that deepspeed.zero.Init sees the init
        n_out = (3 if mode == "film" else 2) * d_model
        self.weight = nn.Parameter(torch.zeros(n_out, d_cond))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (shift, scale, gate), each (B, 1, d_model); scale is 0 in additive mode."""
        out = F.linear(F.silu(c), self.weight, self.bias).unsqueeze(1)
        if self.mode == "film":
            shift, scale, gate = out.chunk(3, dim=-1)
        else:
            shift, gate = out.chunk(2, dim=-1)
            scale = torch.zeros_like(shift)
        return shift, scale, gate
