"""Learning-rate schedule: linear warmup, then cosine or linear decay to lr * min_lr_ratio at max_steps."""
from __future__ import annotations

import math

from dimba.config.schema import TrainingConfig


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based: the factor used for the update that makes step+1)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    return lo + (1 - lo) * (1 - progress)
