"""The training objectives, by name: the one table (`OBJECTIVES`) that `objective` in the config chooses from.

    gaussian  diffusion over token embeddings (the original DIMBA): x0-MSE + CE, DDIM / DDPM samplers, ELBO bound
    masked    absorbing-state diffusion (MDLM): NELBO with the log-linear schedule, ancestral and confidence samplers
    ar        the autoregressive twin: causal backbone, next-token cross-entropy, recurrent decoding, exact NLL

A fourth objective is one folder beside these (an `Objective` subclass, dimba/objectives/base.py), one line in the
table, and its tests.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from dimba.config.core import ConfigError
from dimba.config.schema import OBJECTIVE_NAMES, Config
from dimba.model.build import count_parameters
from dimba.objectives.ar import ARObjective
from dimba.objectives.base import Draw, LossResult, Objective, Request, frame, make_draw, sample_seed
from dimba.objectives.gaussian import GaussianObjective
from dimba.objectives.masked import MaskedObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "gaussian": GaussianObjective,
    "masked": MaskedObjective,
    "ar": ARObjective,
}
assert tuple(OBJECTIVES) == OBJECTIVE_NAMES, "dimba.config.schema.OBJECTIVE_NAMES must list the table's names"


def get_objective(cfg: Config) -> Objective:
    """The objective `cfg.objective` names, bound to `cfg`."""
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {cfg.objective!r}; use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective](cfg)


def build_model(cfg: Config) -> nn.Module:
    """The model of the config's objective (its heads on the shared backbone)."""
    if cfg.model.vocab_size == 0:
        raise ConfigError("model.vocab_size is 0, which launch/train.py fills in from the shards' tokenizer; set it "
                          "to build a model outside training")
    return get_objective(cfg).build_model()


def ar_twin(cfg: Config) -> tuple[Config, int, int]:
    """The autoregressive twin of a diffusion config at equal parameters: same d_model, d_state, headdim and
    vocabulary, causal (one mixer per block), with the number of layers whose total parameter count is closest
    to the diffusion model's (a bidirectional block holds two mixers, so the twin is about twice as deep). The twin
    is all Mamba-2: a hybrid denoiser's attention blocks (model.attn_layer_idx) are not carried over.
    Returns (twin config, model parameters, twin parameters); counted on the meta device (no memory)."""
    def params(c: Config) -> int:
        with torch.device("meta"):
            return count_parameters(build_model(c))

    target = params(cfg)
    best = None
    for n in range(1, 4 * cfg.model.n_layers + 1):
        twin = dataclasses.replace(cfg, objective="ar",
                                   model=dataclasses.replace(cfg.model, bidirectional=False, n_layers=n,
                                                             attn_layer_idx=()))
        p = params(twin)
        if best is None or abs(p - target) < abs(best[1] - target):
            best = (twin, p)
    return best[0], target, best[1]


__all__ = ["OBJECTIVES", "Draw", "LossResult", "Objective", "Request", "ar_twin", "build_model", "frame",
           "get_objective", "make_draw", "sample_seed"]
