"""Likelihood of held-out tokens under the Gaussian objective: a variational upper bound on the NLL.

DIMBA (continuous-time VLB of Kingma et al. 2021, "Variational Diffusion Models", eq. 17 and appendix):
for a sequence w with clean embeddings x0 = embed(w), SNR(t) = alpha_bar / (1 - alpha_bar) and any t0 in (0, 1],

    -log p(w) <= E[-log p(w | z_t0)]                                                    reconstruction
                 + 1/2 int_{t0}^{1} (-dSNR/dt) E ||x0 - x0_hat(z_t, t)||^2 dt             diffusion
                 + KL(q(z_1 | x0) || N(0, I))                                             prior (0 with zero-terminal SNR)

p(w | z_t0) = softmax(logits(z_t0)) per position (the denoiser's token distribution); x0_hat and the logits are
the two-pass self-conditioned estimate (`denoise` with every sample flagged), a deterministic function of (z_t, t),
so the bound holds for it. The norm is summed over the d_embed coordinates and the bound over the scored positions
(neither clean nor padding); the reported number is per scored token.

Two x0 estimates, both functions of (z_t, t), are scored from the same draws: the model's own x0_hat ("head") and
the posterior mean under its token distribution, softmax(logits) @ table ("posterior_mean"). With
model.x0_head "softmax" or "posterior" they coincide. With the linear head they do not: its x0_hat stays a blurred
vector off the table however certain the token, so its squared error, times an SNR that grows without bound,
makes every band of high log-SNR cost more than the last, while the posterior mean snaps to the table as the token
becomes certain. Which one the bound uses is chosen with t0, on the calibration half (below).

Estimator. With lambda = log SNR the diffusion term is exactly 1/2 int SNR(lambda) ||x0 - x0_hat||^2 dlambda over
[lambda_1, lambda(t0)] (no derivative of the schedule is needed). It is split at LOG_SNR_TAIL:
  - [LOG_SNR_TAIL, lambda_top]: N stratified draws of lambda per sequence, u_j = (j + u) / N, u ~ U(0, 1)
    (importance sampling uniform in log-SNR, the usual choice for continuous-time diffusion);
  - [SNR_1, e^LOG_SNR_TAIL] (the almost-pure-noise end): one uniform draw of SNR itself per sequence.
Both are unbiased; the model is told the noise level through t = schedule^-1(lambda) (bisection in float64).

Choice of t0. The bound holds for every t0 and its tightness depends on it: near t = 0 the weight SNR grows
without bound, so a model that is not exact there pays SNR * its error. Like VDM's learned SNR_max, the
truncation point is chosen: candidates lambda(t0) in T0_CANDIDATES (the training range's top, lambda(t_min),
then every 2 nats of log-SNR down to -6) share the same draws; t0 and the x0 estimate are selected together on the
calibration half of the sequences (even index) and the bound is reported on the other half (odd index), so the
reported number is not biased down by the selection. The bound at t0 = diffusion.t_min on all sequences is
reported too, unselected, and so is the diffusion term by band of log-SNR between neighbouring candidates (where
along the noise levels the bound's nats are spent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from dimba.objectives.gaussian.loss import denoise
from dimba.objectives.gaussian.schedule import NoiseSchedule
from dimba.evaluation.errors import EvalError
from dimba.objectives.nll import ppl

LOG_SNR_TAIL = -10.0          # below: one uniform draw in SNR space (the integrand there is < 5e-5 * d_embed)
LOG_SNR_TOP_MAX = 15.0        # cap on lambda(t_min) when t_min = 0 (SNR infinite)
T0_SPACING, T0_FLOOR = 2.0, -6.0
X0_ESTIMATES = ("head", "posterior_mean")   # the model's x0_hat; softmax(logits) @ table


def t_of_log_snr(schedule: NoiseSchedule, lam: torch.Tensor, iters: int = 64) -> torch.Tensor:
    """t in [0, 1] with log SNR(t) = lam (float64, any shape; lam = -inf gives 1). log SNR decreases in t."""
    lam = lam.to(torch.float64)
    lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = schedule.snr(mid).log() > lam          # still less noisy than asked: go later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def log_snr(schedule: NoiseSchedule, t: float) -> float:
    return float(schedule.snr(torch.tensor(t, dtype=torch.float64)).log())


def t0_candidates(lam_top: float) -> list[float]:
    """lambda(t0) candidates, largest (= training range top) first."""
    out = [lam_top]
    c = math.floor(lam_top / T0_SPACING) * T0_SPACING
    while c >= T0_FLOOR:
        if c < lam_top - 1.0:
            out.append(float(c))
        c -= T0_SPACING
    return out


@dataclass
class _Sums:
    """Per-sequence sums over scored tokens (lists of floats, one entry per sequence)."""
    tokens: list = field(default_factory=list)
    prior: list = field(default_factory=list)
    recon: list = field(default_factory=list)       # each: K values, one per candidate
    diffusion: list = field(default_factory=list)   # each: K x len(X0_ESTIMATES) values


def _noised(schedule: NoiseSchedule, x0, clean, lam: torch.Tensor, generator: torch.Generator):
    """(x_t, t) at log-SNR lam (B,) float64; alpha_bar = sigmoid(lam) exactly."""
    ab = torch.sigmoid(lam).to(x0.device).view(-1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = ab.sqrt().float() * x0 + (1 - ab).sqrt().float() * noise
    t = t_of_log_snr(schedule, lam).float().to(x0.device)
    return torch.where(clean.unsqueeze(-1), x0, x_t), t


@torch.no_grad()
def _batch_terms(model, schedule: NoiseSchedule, tokens, clean, pad_id: int, cands: list[float], lam_lo: float,
                 snr_1: float, t_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    b = tokens.size(0)
    x0 = model.embed(tokens)
    scored = (~clean & (tokens != pad_id)).float()
    flag = torch.ones(b, dtype=torch.bool, device=tokens.device)
    d = x0.size(-1)
    lam_top, k = cands[0], len(cands)
    cand_t = torch.tensor(cands, dtype=torch.float64)

    prior = torch.zeros(b, dtype=torch.float64)
    if not schedule.zero_terminal_snr:
        ab1 = float(schedule.alpha_bar(torch.tensor(1.0, dtype=torch.float64)))
        kl_tok = 0.5 * (ab1 * (x0.pow(2).sum(-1) - d) - d * math.log1p(-ab1))
        prior = (kl_tok * scored).sum(1).double().cpu()

    head_is_mean = getattr(model.cfg, "x0_head", "linear") in ("softmax", "posterior")

    def errors(x_t, t) -> torch.Tensor:
        """(B, len(X0_ESTIMATES)) summed squared errors of the model's x0_hat and of its posterior mean."""
        x0_hat, logits = denoise(model, x_t, t, clean, flag)
        mean = x0_hat if head_is_mean else model.token_embedding(probs=logits.float().softmax(-1)).to(x0_hat.dtype)
        return torch.stack([(((e - x0) ** 2).sum(-1) * scored).sum(1).double().cpu() for e in (x0_hat, mean)], -1)

    diffusion = torch.zeros(b, k, len(X0_ESTIMATES), dtype=torch.float64)
    offset = torch.rand(b, generator=generator, dtype=torch.float64)
    width = lam_top - lam_lo
    for j in range(t_samples):                                  # stratified, uniform in log-SNR
        lam = lam_lo + (j + offset) / t_samples * width
        x_t, t = _noised(schedule, x0, clean, lam, generator)
        w = 0.5 * lam.exp() * width / t_samples
        below = (lam.unsqueeze(1) <= cand_t.unsqueeze(0)).unsqueeze(-1)
        diffusion += (w.unsqueeze(1) * errors(x_t, t)).unsqueeze(1) * below
    snr_lo = math.exp(lam_lo)
    if snr_lo > snr_1:                                           # the tail, uniform in SNR
        snr = snr_1 + torch.rand(b, generator=generator, dtype=torch.float64) * (snr_lo - snr_1)
        x_t, t = _noised(schedule, x0, clean, snr.log(), generator)
        diffusion += (0.5 * (snr_lo - snr_1) * errors(x_t, t)).unsqueeze(1)

    recon = torch.zeros(b, k, dtype=torch.float64)
    for i, lam0 in enumerate(cands):
        x_t, t = _noised(schedule, x0, clean, torch.full((b,), lam0, dtype=torch.float64), generator)
        logits = denoise(model, x_t, t, clean, flag)[1]
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        recon[:, i] = (ce * scored).sum(1).double().cpu()
    return scored.sum(1).double().cpu(), prior, recon, diffusion


def _bound(s: _Sums, rows: list[int], k: int, e: int) -> dict:
    n = sum(s.tokens[r] for r in rows)
    rec = sum(s.recon[r][k] for r in rows) / n
    dif = sum(s.diffusion[r][k][e] for r in rows) / n
    pri = sum(s.prior[r] for r in rows) / n
    per_seq = [(s.recon[r][k] + s.diffusion[r][k][e] + s.prior[r]) / s.tokens[r] for r in rows if s.tokens[r] > 0]
    m = sum(per_seq) / len(per_seq)
    se = math.sqrt(sum((v - m) ** 2 for v in per_seq) / max(len(per_seq) - 1, 1) / len(per_seq))
    return {"nll_nats_per_token": rec + dif + pri, "reconstruction": rec, "diffusion": dif, "prior": pri,
            "stderr_nats": se, "tokens": int(n), "sequences": len(rows)}


def elbo_bound(model, schedule: NoiseSchedule, batches: Iterable[dict], pad_id: int, t_min: float,
               t_samples: int = 32, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """The NLL upper bound per token on `batches` (dicts with tokens and clean (B, L)); see the module doc."""
    if t_samples < 1:
        raise ValueError(f"t_samples must be >= 1, got {t_samples}")
    lam_top = min(log_snr(schedule, t_min), LOG_SNR_TOP_MAX)
    lam_1 = -math.inf if schedule.zero_terminal_snr else log_snr(schedule, 1.0)
    lam_lo = max(LOG_SNR_TAIL, lam_1)
    snr_1 = 0.0 if schedule.zero_terminal_snr else math.exp(lam_1)
    cands = [c for c in t0_candidates(lam_top) if c > lam_lo]
    s = _Sums()
    for i, batch in enumerate(batches):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        tokens, clean = batch["tokens"].to(device), batch["clean"].to(device)
        n, prior, recon, diff = _batch_terms(model, schedule, tokens, clean, pad_id, cands, lam_lo, snr_1,
                                                t_samples, g)
        s.tokens += n.tolist()
        s.prior += prior.tolist()
        s.recon += recon.tolist()
        s.diffusion += diff.tolist()
    rows = [r for r in range(len(s.tokens)) if s.tokens[r] > 0]
    if len(rows) < 2:
        raise EvalError(f"the likelihood bound needs at least 2 val sequences with scored tokens (one half selects "
                        f"t0, the other reports), got {len(rows)}; use more --batches or a larger val split")
    calib, held = rows[0::2], rows[1::2]
    pairs = [(k, e) for k in range(len(cands)) for e in range(len(X0_ESTIMATES))]
    best, est = min(pairs, key=lambda ke: _bound(s, calib, *ke)["nll_nats_per_token"])
    by_estimator = {}
    for e, name in enumerate(X0_ESTIMATES):      # each estimate at its own best t0, for comparison
        k_e = min(range(len(cands)), key=lambda k: _bound(s, calib, k, e)["nll_nats_per_token"])
        row = _bound(s, held, k_e, e)
        by_estimator[name] = {"nll_nats_per_token": row["nll_nats_per_token"], "stderr_nats": row["stderr_nats"],
                              "log_snr_t0": cands[k_e],
                              "at_train_t_min": _bound(s, rows, 0, e)["nll_nats_per_token"]}
    by_t0 = []
    for k, lam0 in enumerate(cands):             # with the chosen estimate
        row = _bound(s, rows, k, est)
        by_t0.append({"log_snr_t0": lam0, "t0": float(t_of_log_snr(schedule, torch.tensor(lam0, dtype=torch.float64))),
                      "nll_nats_per_token": row["nll_nats_per_token"], "reconstruction": row["reconstruction"],
                      "diffusion": row["diffusion"], "calibration_nll": _bound(s, calib, k, est)["nll_nats_per_token"]})
    # the diffusion term is cumulative over the candidates (draws with lambda <= lambda(t0)): differences of
    # neighbours give it by band of log-SNR. The lowest band reaches down to lambda_1, tail included; with
    # zero-terminal SNR that is -inf, and the band has no log_snr_from.
    edges = cands[1:] + ([lam_1] if math.isfinite(lam_1) else [None])
    bands = [{**({"log_snr_from": edges[k]} if edges[k] is not None else {}), "log_snr_to": cands[k],
              "nats_per_token": by_t0[k]["diffusion"] - (by_t0[k + 1]["diffusion"] if k + 1 < len(cands) else 0.0)}
             for k in range(len(cands))]
    rep = _bound(s, held, best, est)
    at_tmin = _bound(s, rows, 0, est)
    return {
        "kind": "elbo_upper_bound",
        "estimator": ("continuous-time VLB (Kingma et al. 2021): reconstruction CE at t0 + diffusion term "
                      f"importance-sampled uniform in log-SNR on [{lam_lo:g}, log SNR(t0)] with {t_samples} stratified "
                      "draws per sequence + one uniform-in-SNR draw for the tail + exact prior KL; "
                      + ("self-conditioning on (two-pass x0 estimate); " if model.self_condition else "")
                      + "t0 and the x0 estimate (the model's x0_hat or the posterior mean under its logits) chosen "
                      "on even-indexed sequences, bound reported on odd-indexed ones"),
        "t_samples": t_samples, "tail_samples": int(math.exp(lam_lo) > snr_1),
        "denoiser_calls_per_sequence": (t_samples + int(math.exp(lam_lo) > snr_1) + len(cands))
        * (2 if model.self_condition else 1),
        "self_conditioning": bool(model.self_condition),
        **rep,
        "bits_per_token": rep["nll_nats_per_token"] / math.log(2),
        "ppl_bound": ppl(rep["nll_nats_per_token"]),
        "t0": {"log_snr": cands[best], "t": by_t0[best]["t0"], "selected_on_sequences": len(calib)},
        "x0_estimate": X0_ESTIMATES[est],
        "by_estimator": by_estimator,
        "at_train_t_min": {"t0": by_t0[0]["t0"], "log_snr": cands[0], "nll_nats_per_token": at_tmin["nll_nats_per_token"],
                           "bits_per_token": at_tmin["nll_nats_per_token"] / math.log(2),
                           "reconstruction": at_tmin["reconstruction"], "diffusion": at_tmin["diffusion"],
                           "stderr_nats": at_tmin["stderr_nats"]},
        "by_t0": by_t0,
        "diffusion_by_log_snr": bands,   # all sequences; the reported bound sums the bands up to its t0
    }
