"""Infilling: hide the middle half of held-out windows and score what the model writes there.

For a window of L tokens the first L/4 (prefix) and the last L/4 (suffix) are given and the L/2 in between are
hidden. A diffusion model fills the gap with prefix and suffix held clean; it is also run with the prefix only,
to show what the suffix adds. The autoregressive twin can only continue the prefix (it has no way
to read the suffix), which is the comparison the infilling claim is about. Scores: token accuracy of the
recovered middle against the hidden one (position by position) and sacrebleu BLEU of the decoded middles.
Position-wise accuracy rewards frequent tokens: `mode_baseline` is the accuracy of writing the windows' most
frequent token ("the", ",") at every hidden position, the floor a model must clear to show it read its context;
`over_mode` is the model's accuracy minus that floor, window by window, with its standard error over windows (the
hits of one window are not independent draws). Position-wise accuracy is maximised by the argmax of each position's
marginal: for a diffusion model that is one denoising pass with greedy picks (T = 1); more passes commit tokens
one after another, which makes the text coherent but shifts it against the truth.
"""
from __future__ import annotations

import torch

from dimba.config.schema import SamplingConfig
from dimba.evaluation.prompted import bleu
from dimba.evaluation.textgen import Request, generate
from dimba.objectives import get_objective
from dimba.objectives.nll import stderr


def split_window(length: int) -> tuple[int, int, int]:
    """(prefix, middle, suffix) lengths: a quarter, a half, a quarter."""
    prefix = length // 4
    suffix = length // 4
    return prefix, length - prefix - suffix, suffix


def _score(results, sequences: torch.Tensor, prefix: int, middle: int, mode: int, tokenizer) -> dict:
    truth = sequences[:, prefix:prefix + middle]
    got = torch.tensor([r.middle for r in results], dtype=torch.long)
    hits = (got == truth).double().mean(1).tolist()                     # per window
    over = [h - f for h, f in zip(hits, (truth == mode).double().mean(1).tolist())]
    return {"token_accuracy": sum(hits) / len(hits), "token_accuracy_se": stderr(hits),
            "over_mode": sum(over) / len(over), "over_mode_se": stderr(over),
            "bleu": bleu([tokenizer.decode(g) for g in got], [tokenizer.decode(t) for t in truth])}


def infill_passes(cfg) -> int:
    """How many times `infill` generates every window: prefix only, then with the suffix where the objective reads one."""
    return 2 if get_objective(cfg).uses_suffix else 1


def infill(model, cfg, tokenizer, sequences: torch.Tensor, sampling: SamplingConfig, seed: int = 0,
           batch_size: int = 16, device: torch.device | str = "cpu", on_batch=None) -> dict:
    """Infilling scores on (N, L) held-out windows: with the prefix only (every objective) and with the suffix too
    (objectives that can read one: `infill_passes`). `on_batch(n)`: after each batch of n windows."""
    prefix, middle, suffix = split_window(sequences.size(1))
    out = {"windows": len(sequences), "prefix_len": prefix, "middle_len": middle, "suffix_len": suffix}
    hidden = sequences[:, prefix:prefix + middle]
    mode = torch.mode(sequences.flatten()).values.item()
    out["mode_baseline"] = (hidden == mode).float().mean().item()
    prefix_only = [Request(s[:prefix].tolist(), middle) for s in sequences]
    results, _ = generate(model, cfg, prefix_only, sampling, seed, batch_size, device, on_batch)
    out["prefix_only"] = _score(results, sequences, prefix, middle, mode, tokenizer)
    if infill_passes(cfg) == 2:
        framed = [Request(s[:prefix].tolist(), middle, s[prefix + middle:].tolist()) for s in sequences]
        results, _ = generate(model, cfg, framed, sampling, seed, batch_size, device, on_batch)
        out["with_suffix"] = _score(results, sequences, prefix, middle, mode, tokenizer)
    return out
