"""Gaussian diffusion over token embeddings, the original DIMBA, as an objective.

    model.py       the denoiser's heads on the shared backbone (token table, in/out projections, x0 heads)
    schedule.py    alpha_bar(t), the discrete grid            timewarp.py   the learned time warp (learned state)
    loss.py        x0-MSE + CE with self-conditioning        sampling.py   DDIM / DDPM
    likelihood.py  the continuous-time ELBO bound             denoising.py, context.py   diagnostics by noise level
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from dimba.config.core import ConfigError
from dimba.config.schema import SAMPLERS, SamplingConfig
from dimba.model.build import backbone_flops_per_token
from dimba.objectives.base import Draw, LossResult, Objective
from dimba.objectives.gaussian.loss import diffusion_loss, draw_noise
from dimba.objectives.gaussian.model import DimbaModel
from dimba.objectives.gaussian.schedule import NoiseSchedule
from dimba.objectives.gaussian.timewarp import LearnedTimeWarp


class GaussianObjective(Objective):
    name = "gaussian"
    samplers = SAMPLERS["gaussian"]
    summary_file = "time_warp.json"
    has_diagnostics = True

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.diffusion
        with torch.device("cpu"):                 # a plain table, also when models are built on the meta device
            self.schedule = NoiseSchedule.from_config(d)
        self.warp = (LearnedTimeWarp(d.t_min, d.t_power, start_step=cfg.training.warmup_steps)
                     if d.time_warp == "learned" else None)

    def build_model(self) -> nn.Module:
        return DimbaModel(self.cfg.model)

    def init_model(self, model: nn.Module, unigram_log_probs) -> None:
        if model.has_prior:                      # the posterior head's prior starts at the unigram (resume overwrites)
            log_p = unigram_log_probs()
            if log_p is not None:
                model.init_prior(log_p)

    def flops_per_token(self) -> float:
        """Forward + backward = 3x forward; self-conditioning adds a forward-only pass on the flagged fraction."""
        m = self.cfg.model
        fwd = backbone_flops_per_token(m, self.cfg.data.seq_len) + 2 * m.d_embed * m.vocab_size
        fwd += 2 * m.d_model * m.d_embed * (1 + m.self_condition) + 2 * m.d_model * m.d_embed
        # softmax head: x0_hat = probs @ table; posterior head: also x_t . table^T
        fwd += {"linear": 0, "softmax": 1, "posterior": 2}[m.x0_head] * 2 * m.d_embed * m.vocab_size
        return 3 * fwd + self.cfg.diffusion.self_cond_prob * fwd

    # ---- training ---------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict, draw: Draw, training: bool = True) -> LossResult:
        """x0-MSE + CE (loss.py); the time comes from the sample's own seed (the learned warp's when training)."""
        device = next(model.parameters()).device
        tokens, clean = batch["tokens"].to(device), batch["clean"].to(device)
        noise = draw_noise(self.cfg.diffusion, draw.seeds, tokens.shape[1], self.cfg.model.d_embed, device,
                           self.warp if training else None)
        loss, terms = diffusion_loss(model, self.schedule, self.cfg.diffusion, tokens, clean, noise,
                                     self.cfg.model.pad_id)
        per_sample = {k: terms.pop(k) for k in ("t", "ce_sum", "n")}
        terms.pop("tokens")
        return LossResult(loss, terms, per_sample)

    def observe(self, result: LossResult) -> None:
        if self.warp is not None:
            self.warp.observe(result.per_sample["t"], result.per_sample["ce_sum"], result.per_sample["n"])

    def after_step(self, device) -> None:
        if self.warp is not None:
            self.warp.update(device)          # collective: every rank refits the same curve

    def state_dict(self) -> Optional[dict]:
        return self.warp.state_dict() if self.warp is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.warp is None:
            if state is not None:
                raise ConfigError("the checkpoint was trained with diffusion.time_warp 'learned'; resume it with "
                                  "the time warp it was trained with, or use a new --run-dir")
            return
        if state is None:
            raise ConfigError("the checkpoint was trained without diffusion.time_warp 'learned'; resume it with "
                              "the time warp it was trained with, or use a new --run-dir")
        self.warp.load_state_dict(state)

    def summary(self) -> Optional[dict]:
        return self.warp.summary() if self.warp is not None else None

    def log_extra(self) -> dict[str, float]:
        return {"time_warp/t_median": self.warp.t_of_u(0.5)} if self.warp is not None else {}

    # ---- sampling ---------------------------------------------------------------------------------------
    def sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        sampling = super().sampling(sampling)
        if sampling.steps > self.cfg.diffusion.num_steps:
            raise ConfigError(f"sampling.steps ({sampling.steps}) exceeds the model's diffusion.num_steps "
                              f"({self.cfg.diffusion.num_steps})")
        return sampling

    def sample_frame(self, model, tokens, clean, sampling, generator, device, on_step=None) -> torch.Tensor:
        from dimba.objectives.gaussian.sampling import sample
        return sample(model, self.schedule, sampling, tokens.shape[0], tokens.shape[1], tokens, clean, generator,
                      device, on_step)

    # ---- evaluation -------------------------------------------------------------------------------------
    def likelihood(self, model, batches, t_samples: int = 32, seed: int = 0, device="cpu") -> dict:
        from dimba.objectives.gaussian.likelihood import elbo_bound
        return elbo_bound(model, self.schedule, batches, self.cfg.model.pad_id, self.cfg.diffusion.t_min,
                          t_samples, seed, device)

    def diagnostics(self, model, batches, prior, opts, device) -> dict:
        """The denoiser's loss by noise level, and what its context earns against the context-free posterior."""
        from dimba.objectives.gaussian.context import context_use
        from dimba.objectives.gaussian.denoising import loss_by_t
        pad = self.cfg.model.pad_id
        return {"denoising_by_t": loss_by_t(model, self.schedule, self.cfg.diffusion, batches, pad, opts.t_buckets,
                                            opts.seed, device),
                "context_by_snr": context_use(model, self.schedule, batches, pad, prior, seed=opts.seed,
                                              device=device)}


__all__ = ["GaussianObjective", "DimbaModel", "NoiseSchedule"]
