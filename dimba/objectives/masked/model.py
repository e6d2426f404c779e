"""The masked denoiser: the shared bidirectional Mamba-2 backbone with a token embedding in and a tied head out.

    x_t (B, L) token ids, some of them model.mask_id
    h = Embedding(x_t) (+ nothing: no time conditioning by default; masked.time_conditioning adds FiLM of t)
    h = DimbaBlock(h[, c(t)]) x n_layers   (bidirectional Mamba-2)
    logits = norm(h) . Embedding^T (tied) or lm_head(norm(h))          (B, L, V) float32

The SUBS parameterisation (the mask's logit at -inf, unmasked tokens carried over) is the objective's
(dimba/objectives/masked/loss.py), so that this module stays a plain token-in, logits-out network.

The reversed scan starts at the last position, so right padding would be the first thing the backward direction
reads. The stack never builds such a batch: training and validation windows are packed from whole documents
(the loader never pads), and a generation frame is exactly prefix + middle + suffix. [MASK] is an ordinary token
id to the scan, read like any other.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from dimba.config.schema import ModelConfig
from dimba.model.block import DimbaBlock
from dimba.model.conditioning import RMSNorm, TimestepEmbedding
from dimba.model.embedding import TiedEmbedding


class MaskedDenoiser(nn.Module):
    def __init__(self, cfg: ModelConfig, time_conditioning: bool = False):
        super().__init__()
        self.cfg = cfg
        self.time_conditioning = time_conditioning
        self.embedding = TiedEmbedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.time_embedding = TimestepEmbedding(cfg.cond_dim) if time_conditioning else None
        self.blocks = nn.ModuleList(DimbaBlock(cfg, i, conditioned=time_conditioning) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x_t: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t (B, L) ids; t (B,) in [0, 1] (read only with time conditioning). Returns logits (B, L, V) float32."""
        h = self.embedding(x_t)
        c = None
        if self.time_embedding is not None:
            if t is None:
                raise ValueError("this masked denoiser is time-conditioned (masked.time_conditioning): pass t")
            c = self.time_embedding(t)
        for block in self.blocks:
            h = block(h, c)
        h = self.norm_f(h)
        if self.lm_head is not None:
            return self.lm_head(h).float()
        return self.embedding(hidden=h).float()
