"""Does the denoiser read its context? Its token cross-entropy at fixed noise levels beside two context-free ones.

At log-SNR lambda (alpha_bar = sigmoid(lambda)) every position of a held-out window is noised and the denoiser's
logits (two-pass self-conditioned, as in the likelihood bound) are scored against the true tokens:

    model_ce      the denoiser with the real context
    shuffled_ce   the same noisy vectors with their positions permuted (one permutation per window), each scored
                  against its own token: word order is gone, the bag of noisy words is kept
    bayes_ce      the exact posterior of one token from its own noisy vector under the unigram prior of the train
                  split, log p(w | x_t) = log p(w) + sqrt(ab) / (1 - ab) x_t . e_w - ab / (2 (1 - ab)) |e_w|^2
                  + const: the best any denoiser can do without context

context_gain = bayes_ce - model_ce (nats per token) is what the model earns beyond the best context-free guess at
that noise level; the continuous-time likelihood bound integrates the same information, so a model whose gain is
<= 0 at every lambda has a bound no better than a unigram model's. A negative gain means the model's posterior of
a token from its own vector is off by more than its context earns it. order_gain = shuffled_ce - model_ce is what
word order earns it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from dimba.objectives.gaussian.loss import denoise
from dimba.objectives.gaussian.schedule import NoiseSchedule, bayes_logits
from dimba.objectives.gaussian.likelihood import t_of_log_snr

LOG_SNRS = (-6.0, -4.0, -3.0, -2.0, -1.0, 0.0)    # the band where a token goes from hidden to readable (d_embed 64)


@torch.no_grad()
def context_use(model, schedule: NoiseSchedule, batches: Iterable[dict], pad_id: int,
                log_prior, log_snrs: Sequence[float] = LOG_SNRS, seed: int = 0,
                device: torch.device | str = "cpu") -> list[dict]:
    """One row per lambda in `log_snrs` (see the module doc). `log_prior`: log p(w) (V,), array or tensor, e.g.
    `dimba.data.shards.unigram_log_probs` of the train split; None leaves out the Bayes reference."""
    batches = list(batches)
    table = model.token_embedding.table().detach().float()
    sq_norms = table.pow(2).sum(-1)                 # |e_w|^2: free rows (model.embed_norm "none") differ
    prior = torch.as_tensor(log_prior, dtype=torch.float32, device=device) if log_prior is not None else None
    rows = []
    for lam in log_snrs:
        ab = float(torch.sigmoid(torch.tensor(lam, dtype=torch.float64)))
        sums = {"model": [0.0, 0.0], "shuffled": [0.0, 0.0], "bayes": [0.0, 0.0]}

        def add(key: str, logits: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor) -> None:
            ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")
            sums[key][0] += float((ce * scored).sum())
            sums[key][1] += float(scored.sum())

        for i, batch in enumerate(batches):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            tokens = batch["tokens"].to(device)
            b, length = tokens.shape
            clean = torch.zeros_like(tokens, dtype=torch.bool)
            flag = torch.ones(b, dtype=torch.bool, device=device)
            scored = (tokens != pad_id).float()
            x0 = model.embed(tokens)
            x_t = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, generator=g).to(device)
            t = t_of_log_snr(schedule, torch.full((b,), lam, dtype=torch.float64)).float().to(device)
            add("model", denoise(model, x_t, t, clean, flag)[1], tokens, scored)
            perm = torch.stack([torch.randperm(length, generator=g) for _ in range(b)]).to(device)
            x_s = torch.gather(x_t, 1, perm.unsqueeze(-1).expand_as(x_t))
            add("shuffled", denoise(model, x_s, t, clean, flag)[1], torch.gather(tokens, 1, perm),
                torch.gather(scored, 1, perm))
            if prior is not None:
                add("bayes", bayes_logits(x_t @ table.t(), ab, prior, sq_norms), tokens, scored)
        ce = {k: (s / n if n else None) for k, (s, n) in sums.items()}
        row = {"log_snr": lam, "t": float(t_of_log_snr(schedule, torch.tensor(lam, dtype=torch.float64))),
               "model_ce": ce["model"], "shuffled_ce": ce["shuffled"], "order_gain": ce["shuffled"] - ce["model"],
               "bayes_ce": ce["bayes"] if prior is not None else None,
               "context_gain": ce["bayes"] - ce["model"] if prior is not None else None}
        rows.append(row)
    return rows
