"""Noise schedules: alpha_bar(t) for continuous t in [0, 1] and for the discrete grid t = i / T.

x_t = sqrt(alpha_bar(t)) * x0 + sqrt(1 - alpha_bar(t)) * noise.

- cosine (Nichol & Dhariwal 2021): alpha_bar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) * pi / 2)^2, s = 0.008.
- linear: the continuous form of DDPM's linear betas (Song et al. 2021, VP-SDE with beta from 0.1 to 20):
  alpha_bar(t) = exp(-(beta_min * t + (beta_max - beta_min) * t^2 / 2)).
- zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"): shift and
  scale sqrt(alpha_bar) so that alpha_bar(0) is unchanged and alpha_bar(1) = 0 exactly, so training sees pure noise
  at t = 1, which is where sampling starts. Without it alpha_bar is kept >= ALPHA_BAR_MIN.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

ALPHA_BAR_MIN = 1e-5       # floor when zero_terminal_snr is off (cosine would otherwise reach ~0 at t = 1)
COSINE_OFFSET = 0.008
LINEAR_BETA = (0.1, 20.0)


class NoiseSchedule:
    """alpha_bar, SNR and noising for continuous t; `step_to_t` maps the discrete grid 0..T onto [0, 1]."""

    def __init__(self, kind: Literal["cosine", "linear"] = "cosine", zero_terminal_snr: bool = True,
                 num_steps: int = 1000):
        if kind not in ("cosine", "linear"):
            raise ValueError(f"unknown noise schedule {kind!r}; use 'cosine' or 'linear'")
        self.kind = kind
        self.zero_terminal_snr = zero_terminal_snr
        self.num_steps = num_steps
        one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        self._sqrt_ab0 = self._raw_alpha_bar(zero).sqrt().item()
        self._sqrt_ab1 = self._raw_alpha_bar(one).sqrt().item()

    @classmethod
    def from_config(cls, diffusion) -> "NoiseSchedule":
        """The schedule a `DiffusionConfig` names."""
        return cls(diffusion.schedule, diffusion.zero_terminal_snr, diffusion.num_steps)

    def _raw_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "cosine":
            f = torch.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * (math.pi / 2)) ** 2
            f0 = math.cos(COSINE_OFFSET / (1 + COSINE_OFFSET) * (math.pi / 2)) ** 2
            return f / f0
        lo, hi = LINEAR_BETA
        return torch.exp(-(lo * t + 0.5 * (hi - lo) * t * t))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at continuous times t in [0, 1] (any shape; computed in float64, returned in t's dtype
        if floating, else float32)."""
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        t64 = t.to(torch.float64).clamp(0.0, 1.0)
        ab = self._raw_alpha_bar(t64)
        if self.zero_terminal_snr:
            s0, s1 = self._sqrt_ab0, self._sqrt_ab1
            ab = ((ab.sqrt() - s1) * (s0 / (s0 - s1))).clamp_min(0.0) ** 2
        else:
            ab = ab.clamp_min(ALPHA_BAR_MIN)
        return ab.clamp_max(1.0).to(out_dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def step_to_t(self, step: torch.Tensor | int) -> torch.Tensor:
        """Discrete step i in 0..T -> t = i / T."""
        step = torch.as_tensor(step)
        return step.to(torch.float64) / self.num_steps

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t for a batch: t has shape (B,), x0 and noise (B, ...)."""
        ab = self.alpha_bar(t).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def bayes_logits(dots: torch.Tensor, alpha_bar: torch.Tensor | float, log_prior: torch.Tensor,
                 sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """log p(w | x_t) + const (B, L, V): the exact posterior of one token from its own noisy vector alone, for
    x_t = sqrt(ab) e_w + sqrt(1 - ab) noise under the prior `log_prior` (V,):
    log p(w) + sqrt(ab) / (1 - ab) x_t . e_w - ab / (2 (1 - ab)) |e_w|^2.
    `dots`: x_t . table^T (B, L, V); `alpha_bar`: a float or (B,); `sq_norms`: |e_w|^2 (V,), or None for a table
    whose rows share one norm (the term is then a constant)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float32, device=dots.device)
    ab = ab.view(-1, 1, 1) if ab.dim() else ab
    one_minus = (1 - ab).clamp_min(1e-6)
    logits = log_prior.float() + (ab.sqrt() / one_minus) * dots.float()
    return logits if sq_norms is None else logits - (ab / (2 * one_minus)) * sq_norms.float()


def timestep_grid(num_steps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """Descending discrete steps T = s_0 > s_1 > ... > s_n = 0 with n = `steps` sampling steps.

    uniform: evenly spaced; quadratic: denser near t = 0 (fine detail, as in DDIM's quadratic spacing);
    trailing: T, T - T/n, ... (Lin et al. 2024), identical to uniform when T is a multiple of n.
    """
    if not 1 <= steps <= num_steps:
        raise ValueError(f"sampling steps must be in [1, {num_steps}] (diffusion.num_steps), got {steps}")
    if spacing == "uniform":
        grid = [round(num_steps * (1 - i / steps)) for i in range(steps + 1)]
    elif spacing == "quadratic":
        grid = [round(num_steps * (1 - i / steps) ** 2) for i in range(steps + 1)]
    elif spacing == "trailing":
        stride = num_steps / steps
        grid = [round(num_steps - i * stride) for i in range(steps)] + [0]
    else:
        raise ValueError(f"unknown step spacing {spacing!r}; use uniform, quadratic or trailing")
    # rounding can merge neighbours when steps is close to T: walk back from 0 keeping the grid strictly decreasing
    grid[-1] = 0
    for i in range(steps - 1, -1, -1):
        grid[i] = max(grid[i], grid[i + 1] + 1)
    return grid
