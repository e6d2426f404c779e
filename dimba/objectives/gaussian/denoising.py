"""The training objective's terms per noise level: where along t a DIMBA model is good or bad.

[t_min, 1] is cut into equal buckets; every sequence gets one t drawn uniformly inside each bucket and fresh
noise, and the objective's terms are computed exactly as in training (`diffusion_loss` definitions: mse is the
mean over d_embed, ce the cross-entropy of logits(x0_hat), acc its argmax accuracy, all over positions that are
neither clean nor padding), with self-conditioning on for every sample (the two-pass estimate that sampling
and the likelihood bound use).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from dimba.config.schema import DiffusionConfig
from dimba.objectives.gaussian.loss import denoise, noised_input
from dimba.objectives.gaussian.schedule import NoiseSchedule


@torch.no_grad()
def loss_by_t(model, schedule: NoiseSchedule, cfg: DiffusionConfig, batches: Iterable[dict], pad_id: int,
              buckets: int = 10, seed: int = 0, device: torch.device | str = "cpu") -> list[dict]:
    """One row per bucket: t_lo, t_hi, loss (mse_weight * mse + ce_weight * ce), mse, ce, acc, tokens."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    edges = [cfg.t_min + (1 - cfg.t_min) * i / buckets for i in range(buckets + 1)]
    sums = [{"mse": 0.0, "ce": 0.0, "acc": 0.0, "tokens": 0.0} for _ in range(buckets)]
    for i, batch in enumerate(batches):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        tokens, clean = batch["tokens"].to(device), batch["clean"].to(device)
        b = tokens.size(0)
        scored = (~clean & (tokens != pad_id)).float()
        flag = torch.ones(b, dtype=torch.bool, device=device)
        for k in range(buckets):
            u = torch.rand(b, generator=g)
            t = (edges[k] + (edges[k + 1] - edges[k]) * u).to(device)
            noise = torch.randn(b, tokens.size(1), model.cfg.d_embed, generator=g).to(device)
            x0, x_t = noised_input(model, schedule, tokens, clean, t, noise)
            x0_hat, logits = denoise(model, x_t, t, clean, flag)
            ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
            s = sums[k]
            s["mse"] += float((((x0_hat - x0) ** 2).mean(-1) * scored).sum())
            s["ce"] += float((ce * scored).sum())
            s["acc"] += float(((logits.argmax(-1) == tokens).float() * scored).sum())
            s["tokens"] += float(scored.sum())
    rows = []
    for k, s in enumerate(sums):
        n = max(s["tokens"], 1.0)
        mse, ce = s["mse"] / n, s["ce"] / n
        rows.append({"t_lo": edges[k], "t_hi": edges[k + 1], "loss": cfg.mse_weight * mse + cfg.ce_weight * ce,
                     "mse": mse, "ce": ce, "acc": s["acc"] / n, "tokens": int(s["tokens"])})
    return rows
