"""Exact NLL rows shared by the objectives and evaluation: one dict shape for every likelihood, and the unigram
yardstick (the best NLL of a model that reads no context)."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from dimba.evaluation.errors import EvalError


def ppl(nats: float) -> Optional[float]:
    return math.exp(nats) if nats < 700 else None


def stderr(per_seq: list[float]) -> float:
    """Standard error of the mean of per-sequence values."""
    m = sum(per_seq) / len(per_seq)
    return math.sqrt(sum((v - m) ** 2 for v in per_seq) / max(len(per_seq) - 1, 1) / len(per_seq))


def exact_row(total: float, count: int, per_seq: list[float], estimator: str) -> dict:
    if count == 0:
        raise EvalError("no val tokens to score; use more --batches or a larger val split")
    nll = total / count
    se = stderr(per_seq)
    return {"kind": "exact", "estimator": estimator, "nll_nats_per_token": nll, "bits_per_token": nll / math.log(2),
            "ppl": ppl(nll), "stderr_nats": se, "tokens": count, "sequences": len(per_seq)}


def unigram_nll(log_probs, batches: Iterable[dict], pad_id: int) -> dict:
    """Exact NLL of the best model that reads no context: each val token scored by its train-split unigram
    log-probability (`dimba.data.shards.unigram_log_probs`). The yardstick a denoiser that ignores its context
    meets: its bound cannot go below this by more than what its context earns."""
    lp = torch.as_tensor(log_probs, dtype=torch.float64)
    total, count, per_seq = 0.0, 0, []
    for batch in batches:
        tokens = batch["tokens"].cpu()
        scored = tokens != pad_id
        nll = torch.where(scored, -lp[tokens], 0.0)      # padding's log-probability is -inf
        total += float(nll.sum())
        count += int(scored.sum())
        per_seq += [float(c) / float(n) for c, n in zip(nll.sum(1), scored.sum(1)) if n > 0]
    return {**exact_row(total, count, per_seq, "train-split unigram log-probabilities of the val tokens"),
            "kind": "exact, no context"}
