"""The autoregressive twin as an objective: causal backbone, next-token cross-entropy, exact NLL, recurrent
decoding of [BOS, prefix] (a suffix cannot be used: `uses_suffix` is False)."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dimba.config.schema import SAMPLERS, SamplingConfig
from dimba.data.tokenizer import BOS_ID
from dimba.model.build import backbone_flops_per_token
from dimba.objectives.ar.model import ARModel
from dimba.objectives.base import Draw, LossResult, Objective, Request
from dimba.objectives.nll import exact_row


class ARObjective(Objective):
    name = "ar"
    samplers = SAMPLERS["ar"]
    uses_suffix = False
    parallel = False
    gather_for_sampling = True        # recurrent decoding reads weights outside module forwards

    def build_model(self) -> nn.Module:
        return ARModel(self.cfg.model)

    def flops_per_token(self) -> float:
        m = self.cfg.model
        return 3 * (backbone_flops_per_token(m, self.cfg.data.seq_len) + 2 * m.d_model * m.vocab_size)

    def loss(self, model: nn.Module, batch: dict, draw: Draw, training: bool = True) -> LossResult:
        """Next-token cross-entropy over non-pad targets (no randomness: `draw` is unused)."""
        tokens = batch["tokens"].to(next(model.parameters()).device)
        logits = model(tokens[:, :-1])
        target = tokens[:, 1:]
        scored = (target != self.cfg.model.pad_id).float()
        n = scored.sum().clamp_min(1.0)
        ce = (F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * scored).sum() / n
        with torch.no_grad():
            acc = ((logits.argmax(-1) == target).float() * scored).sum() / n
        return LossResult(ce, {"loss": ce.detach(), "ce": ce.detach(), "acc": acc})

    def generate(self, model: nn.Module, requests: list[Request], sampling: SamplingConfig,
                 generator: torch.Generator, device, on_step: Optional[Callable[[int, int], None]] = None
                 ) -> list[list[int]]:
        """Continuations of [BOS, prefix]; prefixes of unequal length are decoded in sub-batches of equal length."""
        sampling = self.sampling(sampling)
        out: dict[int, list[int]] = {}
        by_len: dict[int, list[int]] = {}
        for k, r in enumerate(requests):
            by_len.setdefault(len(r.prefix), []).append(k)
        for plen, ks in sorted(by_len.items()):
            prompt = torch.tensor([[BOS_ID] + requests[k].prefix for k in ks], dtype=torch.long, device=device)
            gen = model.generate(prompt, requests[ks[0]].middle_length, sampling, generator)
            for row, k in enumerate(ks):
                out[k] = gen[row, plen + 1:].tolist()
        return [out[k] for k in range(len(requests))]

    @torch.no_grad()
    def likelihood(self, model: nn.Module, batches: Iterable[dict], t_samples: int = 0, seed: int = 0,
                   device="cpu") -> dict:
        """Exact NLL: mean next-token cross-entropy over the val tokens (the first token of each sequence has no
        context and is not scored)."""
        pad_id = self.cfg.model.pad_id
        total, count, per_seq = 0.0, 0, []
        for batch in batches:
            tokens = batch["tokens"].to(device)
            logits = model(tokens[:, :-1])
            target = tokens[:, 1:]
            scored = (target != pad_id).float()
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * scored
            total += float(ce.sum())
            count += int(scored.sum())
            per_seq += [float(c) / float(n) for c, n in zip(ce.sum(1), scored.sum(1)) if n > 0]
        return exact_row(total, count, per_seq, "mean next-token cross-entropy over the val tokens (first token of "
                         "each sequence unscored)")
