"""Masked (absorbing-state) diffusion, MDLM's recipe (Sahoo et al. 2024): forward process, SUBS, the NELBO.

Forward process with the log-linear schedule alpha_t = 1 - t: each token that may be noised (neither clean nor
padding) is replaced by [MASK] with probability t, independently.

SUBS parameterisation of the reverse model: the mask's logit is -inf (the model never predicts [MASK]) and a
token that is not masked is carried over (its prediction is itself, exactly; it costs nothing and is not scored).

Continuous-time NELBO (MDLM eq. 10 with alpha_t = 1 - t, so -alpha'_t / (1 - alpha_t) = 1 / t):

    -log p(x) <= E_{t ~ U[0, 1]} E_{x_t} [ sum over masked positions l of  (1 / t) * -log p_theta(x^l | x_t) ]

Training draws t in [t_eps, 1] (the trainer's low-discrepancy uniforms over the global batch) and divides the sum
by the number of scored tokens (masked or not), so the loss is nats per token. With masked.t_sampling
"logit_normal" training maps the same uniforms to t = sigmoid(std * Phi^-1(u)) instead: more draws near t = 1/2,
where a token's near context is partly visible, fewer at the ends; the 1/t weight is kept, so the training loss is
a reweighting of the NELBO, not the NELBO (validation and `nelbo_per_sequence` keep uniform t). Clean positions
(prompts, infill frames) are never masked and never scored; with probability masked.cond_dropout a sample's clean
positions become ordinary ones (noised and scored), which trains the unconditional branch of classifier-free
guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class MaskDraw:
    t: torch.Tensor            # (B,) float32
    masked: torch.Tensor       # (B, L) bool: positions replaced by [MASK]
    drop_cond: torch.Tensor    # (B,) bool


def times(u: torch.Tensor, t_eps: float, sampling: str = "uniform", logit_std: float = 0.6) -> torch.Tensor:
    """Diffusion times (float64) from uniforms u in [0, 1): uniform on [t_eps, 1], or logit-normal
    sigmoid(logit_std * Phi^-1(u)) clamped to [t_eps, 1] (a monotone map, so low-discrepancy u stay spread)."""
    u = u.double()
    if sampling == "logit_normal":
        return torch.sigmoid(logit_std * torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12))).clamp(t_eps, 1.0)
    return t_eps + (1 - t_eps) * u


def draw_masks(seeds: list[int], u: torch.Tensor, scorable: torch.Tensor, clean: torch.Tensor, t_eps: float,
               cond_dropout: float, sampling: str = "uniform", logit_std: float = 0.6) -> MaskDraw:
    """Per-sample randomness on the CPU from the sample's seed (so it is the same on any device and any split of
    the batch): the dropout coin and one uniform per position; t = times(u, ...)."""
    b, length = scorable.shape
    t = times(u, t_eps, sampling, logit_std)
    coins, rows = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        coins.append(bool(torch.rand(1, generator=g, dtype=torch.float64).item() < cond_dropout))
        rows.append(torch.rand(length, generator=g, dtype=torch.float64))
    drop = torch.tensor(coins, dtype=torch.bool)
    r = torch.stack(rows)
    device = scorable.device
    drop, r, t = drop.to(device), r.to(device), t.to(device)
    may = scorable | (clean & drop.unsqueeze(-1))
    masked = may & (r < t.unsqueeze(-1))
    return MaskDraw(t=t.float(), masked=masked, drop_cond=drop)


def subs_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p_theta(x0 | x_t) (B, L, V) float32 with the mask's logit at -inf (SUBS); the carry-over of unmasked
    tokens is applied by the callers, which score and sample masked positions only."""
    logits = logits.float().clone()
    logits[..., mask_id] = NEG_INF
    return logits.log_softmax(-1)


def masked_nelbo(model, tokens: torch.Tensor, clean: torch.Tensor, draw: MaskDraw, mask_id: int, pad_id: int,
                 time_conditioning: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) for one batch: loss = sum over masked tokens of CE / t, divided by the scored tokens.
    Metrics: loss, ce (mean CE over masked tokens), acc (argmax on masked tokens), mask_frac."""
    clean = clean & ~draw.drop_cond.unsqueeze(-1)
    scored = ~clean & (tokens != pad_id) & (tokens != mask_id)
    x_t = torch.where(draw.masked, torch.full_like(tokens, mask_id), tokens)
    logits = model(x_t, draw.t if time_conditioning else None)
    log_p = subs_log_probs(logits, mask_id)
    ce = -log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    m = draw.masked.float()
    ce = torch.where(draw.masked, ce, torch.zeros_like(ce))          # unmasked: carried over, costs nothing
    n = scored.float().sum().clamp_min(1.0)
    loss = (ce / draw.t.unsqueeze(-1)).sum() / n
    with torch.no_grad():
        n_masked = m.sum().clamp_min(1.0)
        metrics = {"loss": loss.detach(), "ce": (ce.sum() / n_masked).detach(),
                   "acc": ((log_p.argmax(-1) == tokens).float() * m).sum() / n_masked,
                   "mask_frac": m.sum() / n}
    return loss, metrics


@torch.no_grad()
def nelbo_per_sequence(model, tokens: torch.Tensor, clean: torch.Tensor, mask_id: int, pad_id: int,
                       time_conditioning: bool, t_samples: int, generator: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(NELBO nats summed over each sequence's scored tokens (B,) float64, scored tokens (B,)): the mean over
    `t_samples` stratified times t_k = (k + u) / K, u ~ U(0, 1) per sequence, over the whole of (0, 1) (an
    unbiased estimate of the continuous-time bound, no t_eps cut-off), one mask draw per time."""
    b, length = tokens.shape
    scored = ~clean & (tokens != pad_id) & (tokens != mask_id)
    total = torch.zeros(b, dtype=torch.float64)
    base = torch.rand(b, generator=generator, dtype=torch.float64)
    for k in range(t_samples):
        t = ((k + base) / t_samples).clamp_min(1e-6)
        r = torch.rand(b, length, generator=generator, dtype=torch.float64)
        masked = scored & (r < t.unsqueeze(-1)).to(tokens.device)
        x_t = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
        tt = t.float().to(tokens.device)
        log_p = subs_log_probs(model(x_t, tt if time_conditioning else None), mask_id)
        ce = -log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()
        ce = torch.where(masked, ce, torch.zeros_like(ce))
        total += (ce.sum(-1).cpu() / t)
    return total / t_samples, scored.sum(-1).double().cpu()
