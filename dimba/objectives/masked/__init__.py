"""Masked (absorbing-state) diffusion on the DIMBA backbone, MDLM's recipe, as an objective.

    model.py     the denoiser: token embedding -> bidirectional Mamba-2 blocks -> tied head
    loss.py      forward masking, SUBS, the continuous-time NELBO (training loss and held-out bound)
    sampling.py  ancestral (MDLM, with caching) and confidence (LLaDA / MaskGIT, semi-autoregressive blocks)

The [MASK] id is model.mask_id: the tokenizer's <mask> piece (dimba/data/tokenizer.py), filled in at launch.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from dimba.config.core import ConfigError
from dimba.config.schema import SAMPLERS
from dimba.model.build import backbone_flops_per_token
from dimba.objectives.base import Draw, LossResult, Objective
from dimba.objectives.masked.loss import draw_masks, masked_nelbo, nelbo_per_sequence
from dimba.objectives.masked.model import MaskedDenoiser
from dimba.objectives.masked.sampling import sample_masked
from dimba.objectives.nll import ppl, stderr


class MaskedObjective(Objective):
    name = "masked"
    samplers = SAMPLERS["masked"]
    best_guess_sampler = "confidence"      # argmax picks, most confident first (MaskGIT / LLaDA decoding)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mcfg = cfg.masked

    @property
    def mask_id(self) -> int:
        m = self.cfg.model.mask_id
        if m < 0:
            raise ConfigError("the masked objective needs a [MASK] id and model.mask_id is unset: use a tokenizer "
                              "with a <mask> piece (add one with `python data_prep/train_tokenizer.py --add-mask`) "
                              "or set model.mask_id")
        return m

    def build_model(self) -> nn.Module:
        self.mask_id      # refuse a model without a mask id before anything is built
        return MaskedDenoiser(self.cfg.model, self.mcfg.time_conditioning)

    def flops_per_token(self) -> float:
        m = self.cfg.model
        return 3 * (backbone_flops_per_token(m, self.cfg.data.seq_len) + 2 * m.d_model * m.vocab_size)

    def loss(self, model: nn.Module, batch: dict, draw: Draw, training: bool = True) -> LossResult:
        device = next(model.parameters()).device
        tokens, clean = batch["tokens"].to(device), batch["clean"].to(device)
        # a [MASK] id in the data (never in text a <mask>-aware tokenizer encodes) is scored like padding: not at all
        valid = (tokens != self.cfg.model.pad_id) & (tokens != self.mask_id)
        scorable = ~clean & valid
        # training may draw t from a bell (masked.t_sampling); validation always scores the NELBO (uniform t)
        sampling = self.mcfg.t_sampling if training else "uniform"
        masks = draw_masks(draw.seeds, draw.u, scorable, clean & valid, self.mcfg.t_eps, self.mcfg.cond_dropout,
                           sampling, self.mcfg.t_logit_std)
        loss, metrics = masked_nelbo(model, tokens, clean, masks, self.mask_id, self.cfg.model.pad_id,
                                     self.mcfg.time_conditioning)
        return LossResult(loss, metrics)

    def sample_frame(self, model, tokens, clean, sampling, generator, device, on_step=None) -> torch.Tensor:
        return sample_masked(model, tokens.to(device), clean.to(device), sampling, self.mask_id,
                             self.mcfg.time_conditioning, generator, on_step)

    def likelihood(self, model, batches: Iterable[dict], t_samples: int = 32, seed: int = 0, device="cpu") -> dict:
        """The continuous-time NELBO per scored token on held-out batches: `t_samples` stratified times per
        sequence over (0, 1), one mask draw each; its standard error over sequences."""
        total, count, per_seq = 0.0, 0, []
        for i, batch in enumerate(batches):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            tokens, clean = batch["tokens"].to(device), batch["clean"].to(device)
            nats, n = nelbo_per_sequence(model, tokens, clean, self.mask_id, self.cfg.model.pad_id,
                                         self.mcfg.time_conditioning, t_samples, g)
            total += float(nats.sum())
            count += int(n.sum())
            per_seq += [float(a) / float(b) for a, b in zip(nats, n) if b > 0]
        if count == 0:
            from dimba.evaluation.errors import EvalError
            raise EvalError("no val tokens to score; use more --batches or a larger val split")
        nll = total / count
        return {"kind": "nelbo_upper_bound",
                "estimator": (f"continuous-time NELBO (MDLM, alpha_t = 1 - t): {t_samples} stratified t per sequence "
                              "over (0, 1), one mask draw each, sum of CE / t over masked tokens per scored token"),
                "t_samples": t_samples, "nll_nats_per_token": nll, "bits_per_token": nll / 0.6931471805599453,
                "ppl_bound": ppl(nll), "stderr_nats": stderr(per_seq) if per_seq else None, "tokens": count,
                "sequences": len(per_seq)}


__all__ = ["MaskedObjective", "MaskedDenoiser"]
