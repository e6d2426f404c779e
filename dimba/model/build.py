"""Model construction from the config, parameter counts and the FLOP count behind MFU."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from dimba.config.schema import ModelConfig


def build_model(cfg: ModelConfig, schedule=None) -> nn.Module:
    """The model named by `cfg.kind` ('dimba': diffusion denoiser; 'ar': autoregressive twin). `schedule` (a
    NoiseSchedule): the denoiser's alpha_bar(t), which it reads itself with model.posterior_input."""
    if cfg.kind == "dimba":
        from dimba.model.dimba import DimbaModel
        return DimbaModel(cfg, schedule)
    if cfg.kind == "ar":
        from dimba.model.ar import ARModel
        return ARModel(cfg)
    raise ValueError(f"unknown model.kind {cfg.kind!r}; use 'dimba' or 'ar'")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, also for a model on the meta device or partitioned by ZeRO-3 (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def mixer_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of one Mamba-2 mixer per token, Megatron-LM's count:
    in_proj 2*h*(2*d_in + 2*G*N + nheads) + SSD scan 7*d_in*N + out_proj 2*d_in*h."""
    h, d_in, n, g = cfg.d_model, cfg.expand * cfg.d_model, cfg.d_state, cfg.ngroups
    nheads = d_in // cfg.headdim
    return 2 * h * (2 * d_in + 2 * g * n + nheads) + 7 * d_in * n + 2 * d_in * h


def train_flops_per_token(cfg: ModelConfig, self_cond_prob: float = 0.0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) for MFU. A DIMBA block holds two mixers when
    bidirectional; the output logits cost 2*d_embed*V (more for the softmax and posterior heads).
    Self-conditioning adds a forward-only pass on the flagged fraction of the batch (counted at 1x forward)."""
    mixers = cfg.n_layers * (2 if cfg.bidirectional else 1)
    d_out = cfg.d_embed if cfg.kind == "dimba" else cfg.d_model
    fwd = mixers * mixer_flops_per_token(cfg) + 2 * d_out * cfg.vocab_size
    if cfg.kind == "dimba":
        in_blocks = 1 + cfg.self_condition + cfg.posterior_input            # x_t, self_cond, posterior mean
        fwd += 2 * cfg.d_model * cfg.d_embed * in_blocks + 2 * cfg.d_model * cfg.d_embed
        # softmax head: x0_hat = probs @ table; posterior head: also x_t . table^T; posterior input: both again
        fwd += ({"linear": 0, "softmax": 1, "posterior": 2}[cfg.x0_head] + 2 * cfg.posterior_input) \
            * 2 * cfg.d_embed * cfg.vocab_size
    return 3 * fwd + self_cond_prob * fwd


def ar_twin(cfg: ModelConfig) -> tuple[ModelConfig, int, int]:
    """The autoregressive twin of a DIMBA model config at equal parameters: same d_model, d_state, headdim and
    vocabulary, causal (one mixer per block), with the number of layers whose total parameter count is closest
    to DIMBA's (a bidirectional DIMBA block holds two mixers, so the twin is about twice as deep).
    Returns (twin config, DIMBA parameters, twin parameters); counted on the meta device (no memory)."""
    def params(c: ModelConfig) -> int:
        with torch.device("meta"):
            return count_parameters(build_model(c))

    target = params(cfg)
    best = None
    for n in range(1, 4 * cfg.n_layers + 1):
        twin = dataclasses.replace(cfg, kind="ar", bidirectional=False, n_layers=n)
        p = params(twin)
        if best is None or abs(p - target) < abs(best[1] - target):
            best = (twin, p)
    return best[0], target, best[1]
