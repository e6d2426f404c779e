"""The DIMBA training objective: x0-MSE plus a cross-entropy anchor, with self-conditioning.

For clean tokens x0 = embed(tokens), a time t = t_min + (1 - t_min) u^t_power (u ~ U(0, 1)) and noise eps:
    x_t = sqrt(ab(t)) x0 + sqrt(1 - ab(t)) eps          (clean positions keep x0)
    with probability self_cond_prob:  sc = stopgrad(model(x_t, t, clean, 0))   else sc = 0
    x0_hat = model(x_t, t, clean, sc)
    loss = mse_weight * |x0_hat - x0|^2 / d_embed + ce_weight * CE(logits, tokens)
(logits: the denoiser's token distribution; see model.x0_head.)
Both terms are averaged over the positions that are neither clean nor padding. With probability cond_dropout a
sample loses its conditioning (no clean positions: every token is noised and scored), which trains the
unconditional branch used by classifier-free guidance.

The randomness (t, eps, the self-conditioning and dropout coin flips) comes from `draw_noise`, one generator per
sample seeded by the trainer's Draw (dimba/objectives/base.py), so a sample's noise depends only on its own seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dimba.config.schema import DiffusionConfig
from dimba.objectives.gaussian.schedule import NoiseSchedule


@dataclass
class NoiseDraw:
    t: torch.Tensor            # (B,) float32 in [t_min, 1]
    noise: torch.Tensor        # (B, L, d_embed) float32
    self_cond: torch.Tensor    # (B,) bool
    drop_cond: torch.Tensor    # (B,) bool


def draw_noise(cfg: DiffusionConfig, seeds: list[int], seq_len: int, d_embed: int,
               device: torch.device | str = "cpu", warp=None) -> NoiseDraw:
    """Per-sample randomness from per-sample seeds (drawn on the CPU, so it is the same on any device). `warp`
    (a LearnedTimeWarp, training only) maps the time uniform to t instead of the power warp."""
    t, noise, sc, drop = [], [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        u = torch.rand(3, generator=g, dtype=torch.float64)
        t.append(warp.t_of_u(u[0].item()) if warp is not None else cfg.t_min + (1 - cfg.t_min) * u[0].item() ** cfg.t_power)
        sc.append(bool(u[1].item() < cfg.self_cond_prob))
        drop.append(bool(u[2].item() < cfg.cond_dropout))
        noise.append(torch.randn(seq_len, d_embed, generator=g))
    return NoiseDraw(t=torch.tensor(t, dtype=torch.float32, device=device),
                     noise=torch.stack(noise).to(device),
                     self_cond=torch.tensor(sc, device=device),
                     drop_cond=torch.tensor(drop, device=device))


def noised_input(model, schedule: NoiseSchedule, tokens: torch.Tensor, clean: torch.Tensor,
                 t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, x_t) with clean positions left at x0."""
    x0 = model.embed(tokens)
    x_t = schedule.add_noise(x0, t, noise)
    return x0, torch.where(clean.unsqueeze(-1), x0, x_t)


def denoise(model, x_t: torch.Tensor, t: torch.Tensor, clean: torch.Tensor,
            use_self_cond: torch.Tensor | None = None, with_logits: bool = True):
    """(x0_hat, logits), or x0_hat alone without `with_logits`, with self-conditioning on the samples flagged in
    `use_self_cond` (B,) bool: a first pass without gradient gives the estimate fed to the second pass; unflagged
    samples get zeros. The first pass runs whenever `use_self_cond` is given, even if no sample is flagged: under
    ZeRO-3 every rank must run the same forwards (parameters are gathered collectively), and the flags differ
    between ranks."""
    sc = None
    if model.self_condition and use_self_cond is not None:
        with torch.no_grad():
            first = model(x_t, t, clean, None)
        sc = torch.where(use_self_cond.view(-1, 1, 1), first, torch.zeros_like(first)).detach()
    return model(x_t, t, clean, sc, with_logits=with_logits)


def diffusion_loss(model, schedule: NoiseSchedule, cfg: DiffusionConfig, tokens: torch.Tensor,
                   clean: torch.Tensor, draw: NoiseDraw, pad_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, terms). `terms` holds detached scalars: loss, mse, ce, acc (argmax accuracy of x0_hat),
    and the number of scored tokens; and, per sample (B,), "t", "ce_sum" (summed token CE) and "n" (scored
    tokens), which a learned time warp reads (callers that average `terms` pop them first: PER_SAMPLE_TERMS)."""
    clean = clean & ~draw.drop_cond.unsqueeze(-1)
    x0, x_t = noised_input(model, schedule, tokens, clean, draw.t, draw.noise)
    x0_hat, logits = denoise(model, x_t, draw.t, clean, draw.self_cond if cfg.self_cond_prob > 0 else None)
    scored = (~clean & (tokens != pad_id)).float()
    n = scored.sum().clamp_min(1.0)
    mse = (((x0_hat - x0) ** 2).mean(-1) * scored).sum() / n
    ce_tok = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    ce = (ce_tok * scored).sum() / n
    loss = cfg.mse_weight * mse + cfg.ce_weight * ce
    with torch.no_grad():
        acc = ((logits.argmax(-1) == tokens).float() * scored).sum() / n
    terms = {"loss": loss.detach(), "mse": mse.detach(), "ce": ce.detach(), "acc": acc, "tokens": scored.sum(),
             "t": draw.t, "ce_sum": (ce_tok * scored).sum(-1).detach(), "n": scored.sum(-1)}
    return loss, terms
