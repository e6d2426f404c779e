"""One residual block of the denoiser: norm -> modulation -> (bidirectional) Mamba-2 -> gated residual.

Bidirectional: two full `Mamba2` mixers, one reading left to right and one reading the reversed sequence, outputs
added (as in MDLM's BiMamba and Caduceus). We do NOT share in/out projections between the directions: each
direction stays a complete, standard `Mamba2` whose state dict loads into `mamba_ssm.Mamba2` as is, so the fused
kernels and external tools apply to both unchanged. The price is 2x the mixer parameters per block, which the
configs account for (see `dimba.model.build.count_parameters`). `bidirectional=False` keeps only the forward
(causal) mixer: for ablation and the autoregressive twin. A block listed in `model.attn_layer_idx` mixes with one
multi-head self-attention over the whole sequence instead (dimba/model/attention.py): a hybrid denoiser.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dimba.config.schema import ModelConfig
from dimba.model.attention import Attention
from dimba.model.conditioning import Modulation, RMSNorm
from dimba.model.mamba2 import Mamba2


def make_mixer(cfg: ModelConfig, layer_idx: int) -> Mamba2:
    return Mamba2(d_model=cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                  headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size, layer_idx=layer_idx,
                  impl=cfg.mixer_impl)


class DimbaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, conditioned: bool = True):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if layer_idx in cfg.attn_layer_idx:
            self.mixer = Attention(cfg.d_model, cfg.attn_heads, causal=not cfg.bidirectional, layer_idx=layer_idx)
            self.mixer_rev = None                       # attention reads both directions itself
        else:
            self.mixer = make_mixer(cfg, layer_idx)
            self.mixer_rev = make_mixer(cfg, layer_idx) if cfg.bidirectional else None
        self.modulation = Modulation(cfg.cond_dim, cfg.d_model, cfg.conditioning) if conditioned else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        if self.modulation is not None:
            shift, scale, gate = self.modulation(c)
            h = h * (1 + scale) + shift
        y = self.mixer(h)
        if self.mixer_rev is not None:
            y = y + self.mixer_rev(h.flip(1)).flip(1)
        if self.modulation is not None:
            y = gate * y
        return x + y
