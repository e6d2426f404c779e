"""Parameter counts and the backbone FLOP count behind MFU (each objective adds its heads' FLOPs)."""
from __future__ import annotations

import torch.nn as nn

from dimba.config.schema import ModelConfig


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, also for a model on the meta device or partitioned by ZeRO-3 (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def mixer_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of one Mamba-2 mixer per token, Megatron-LM's count:
    in_proj 2*h*(2*d_in + 2*G*N + nheads) + SSD scan 7*d_in*N + out_proj 2*d_in*h."""
    h, d_in, n, g = cfg.d_model, cfg.expand * cfg.d_model, cfg.d_state, cfg.ngroups
    nheads = d_in // cfg.headdim
    return 2 * h * (2 * d_in + 2 * g * n + nheads) + 7 * d_in * n + 2 * d_in * h


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one attention mixer per token: q, k, v and out projections 8*h^2, scores and their
    weighted sum 4*L*h over the whole sequence (bidirectional)."""
    return 8 * cfg.d_model ** 2 + 4 * seq_len * cfg.d_model


def backbone_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the block stack (two Mamba-2 mixers per block when bidirectional, one attention
    mixer in each block of `attn_layer_idx`)."""
    n_attn = len(cfg.attn_layer_idx)
    mamba = (cfg.n_layers - n_attn) * (2 if cfg.bidirectional else 1) * mixer_flops_per_token(cfg)
    return mamba + n_attn * attention_flops_per_token(cfg, seq_len)


