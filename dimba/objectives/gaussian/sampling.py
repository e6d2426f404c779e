"""Samplers: DDPM ancestral and DDIM over the discrete grid, then logits -> tokens.

Every step goes from t to s < t on the grid from `timestep_grid`:
    x0_hat = model(x_t, t, clean, self_cond = previous x0_hat)
    DDIM:  eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)
           sigma   = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)
           x_s     = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z
    DDPM:  x_s ~ q(x_s | x_t, x0_hat) = N(mean, var) with the Gaussian posterior of the forward process
The tokens are picked from the last model call's logits (with guidance: lu + s (lc - lu), which for a linear
x0 head equals the logits of the guided x0_hat). Clean positions enter every model call as their exact x0 and
their tokens are returned unchanged.
The update arithmetic runs in `precision` (float32 or float64); the model runs in its own dtype. All randomness
comes from one torch.Generator on the CPU, so a seed gives the same tokens bit for bit (on another device, up
to rounding); the final pick runs on the model's device (`pick_tokens`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from dimba.config.schema import SamplingConfig
from dimba.objectives.gaussian.schedule import NoiseSchedule, timestep_grid
from dimba.objectives.sampling import pick_tokens


def ddim_update(x: torch.Tensor, x0_hat: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor, eta: float = 0.0,
                z: torch.Tensor | float = 0.0) -> torch.Tensor:
    """One DDIM step from t to s (the module doc's formula); z: fresh noise, used when eta > 0."""
    eps_hat = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
    sigma = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).clamp_min(0).sqrt()
    return ab_s.sqrt() * x0_hat + (1 - ab_s - sigma ** 2).clamp_min(0).sqrt() * eps_hat + sigma * z


@torch.no_grad()
def sample(model, schedule: NoiseSchedule, cfg: SamplingConfig, batch_size: int, length: int,
           clean_tokens: Optional[torch.Tensor] = None, clean: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu",
           on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Generate (batch_size, length) tokens. `clean_tokens` (B, L) with `clean` (B, L) bool gives the positions
    that are held fixed (a prompt prefix, an infilling frame, ...). `on_step(i, n)` is called after each step.

    Classifier-free guidance (cfg.guidance = s != 1): one batched forward gives the conditional estimate x0_c (clean
    positions given) and the unconditional x0_u (nothing given; the clean positions follow their own noisy
    trajectory, exactly as in an unconditional run); the update uses x0_u + s * (x0_c - x0_u). s = 1 skips the
    unconditional half (the plain conditional sampler), s = 0 reproduces the unconditional sampler's draws."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sampler = cfg.sampler or "ddim"                         # "": the objective's default
    dt = torch.float64 if cfg.precision == "float64" else torch.float32
    d = model.cfg.d_embed
    if clean is None:
        clean = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        clean_tokens = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    if clean_tokens is None or clean.shape != (batch_size, length) or clean_tokens.shape != (batch_size, length):
        raise ValueError(f"clean and clean_tokens must both have shape ({batch_size}, {length})")
    clean, clean_tokens = clean.to(device), clean_tokens.to(device)
    guided = cfg.guidance != 1.0
    keep = clean.unsqueeze(-1)
    none = torch.zeros_like(clean)
    x0_clean = model.embed(clean_tokens).to(dt)
    # x: the free trajectory of every position; the conditional branch sees x0_clean at the clean positions instead
    x = torch.randn(batch_size, length, d, generator=generator, dtype=dt).to(device)
    grid = timestep_grid(schedule.num_steps, cfg.steps, cfg.spacing)
    x0_c = x0_u = x0_hat = None
    x0_opts = {"x0_temperature": cfg.x0_temperature} if cfg.x0_temperature != 1.0 else {}
    last = len(grid) - 2
    for i, (step_t, step_s) in enumerate(zip(grid[:-1], grid[1:])):
        opts = {**x0_opts, "with_logits": i == last}          # the V-wide logits only where tokens are picked
        t = schedule.step_to_t(step_t).to(dt)
        s = schedule.step_to_t(step_s).to(dt)
        ab_t, ab_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
        tb = torch.full((batch_size,), float(t), device=device)
        x_c = torch.where(keep, x0_clean, x)
        if guided:
            sc = torch.cat([x0_c, x0_u]).float() if (model.self_condition and x0_c is not None) else None
            out = model(torch.cat([x_c, x]).float(), torch.cat([tb, tb]), torch.cat([clean, none]), sc, **opts)
            both, both_logits = out if i == last else (out, None)
            x0_c, x0_u = both.to(dt)[:batch_size], both.to(dt)[batch_size:]
            x0_hat = torch.where(keep, x0_u, x0_u + cfg.guidance * (x0_c - x0_u))
            if i == last:
                lc, lu = both_logits[:batch_size], both_logits[batch_size:]
                logits = lu + cfg.guidance * (lc - lu)
        else:
            sc = x0_c.float() if (model.self_condition and x0_c is not None) else None
            out = model(x_c.float(), tb, clean, sc, **opts)
            x0_c, logits = out if i == last else (out, None)
            x0_c = x0_c.to(dt)
            x0_hat = x0_c
        # fresh noise only where the update adds some (DDIM with eta 0 is deterministic): on a GPU each draw is
        # a host-side randn of B x L x d values and a copy
        z = (torch.randn(batch_size, length, d, generator=generator, dtype=dt).to(device)
             if sampler == "ddpm" or cfg.eta > 0 else 0.0)
        if sampler == "ddim":
            x = ddim_update(x, x0_hat, ab_t, ab_s, cfg.eta, z)
        elif sampler == "ddpm":
            a_ts = ab_t / ab_s                                   # alpha from s to t
            coef_x0 = ab_s.sqrt() * (1 - a_ts) / (1 - ab_t)
            coef_xt = a_ts.sqrt() * (1 - ab_s) / (1 - ab_t)
            var = (1 - ab_s) / (1 - ab_t) * (1 - a_ts)
            x = coef_x0 * x0_hat + coef_xt * x + var.clamp_min(0).sqrt() * z
        else:
            raise ValueError(f"unknown sampler {cfg.sampler!r}; use ddpm or ddim")
        if on_step is not None:
            on_step(i + 1, len(grid) - 1)
    tokens = pick_tokens(logits, cfg, generator)        # the last call's logits (guided like x0_hat)
    return torch.where(clean, clean_tokens, tokens)
