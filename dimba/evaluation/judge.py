"""Generative perplexity: how likely an independent autoregressive judge finds generated text.

The judge is a DIMBA-stack AR model (model.kind "ar": any folder `load_model_dir` opens). Its training data
should differ from the evaluated model's, or the number measures memorisation more than quality.

Each sample is scored on its own: the judge reads EOS (the document separator it saw in training, so "start of
a document") and then the sample, and gen PPL = exp(total cross-entropy / total scored tokens) over all samples.
When the judge shares the evaluated model's tokenizer (same sha256) the token ids are scored as generated
(padding ids, which have no text, are dropped); otherwise the text is decoded and re-encoded with the judge's
tokenizer. Samples longer than the judge's data.seq_len are cut to it (the length it was trained on).
The same judge scores held-out text of the same length as a reference point (`reference_gen_ppl`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dimba.data.tokenizer import EOS_ID, PAD_ID
from dimba.evaluation.errors import EvalError


def _same_weights(a, b) -> bool:
    if a.cfg.model != b.cfg.model:
        return False
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def check_judge(judge, model) -> list[str]:
    """`judge` and `model` are LoadedModels. The judge must be an AR model other than the evaluated one;
    returns warnings about its independence (empty if none)."""
    if judge.cfg.model.kind != "ar":
        raise EvalError(f"--judge must be an autoregressive model (model.kind 'ar'); the folder given holds a "
                        f"model.kind {judge.cfg.model.kind!r} model. Train one with --set model.kind=ar "
                        "--set model.bidirectional=false on other data")
    if judge.model is model.model or _same_weights(judge, model):
        raise EvalError("--judge holds the evaluated model itself (same config and weights); a model cannot judge "
                        "its own samples: use an AR model trained on other data")
    if Path(judge.cfg.data.shards).resolve() == Path(model.cfg.data.shards).resolve():
        return [f"the judge was trained on the same shards as the evaluated model ({judge.cfg.data.shards}); "
                "gen PPL is then not from an independent judge"]
    return []


def judge_tokens(judge_tokenizer, source_tokenizer, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Samples (ids of `source_tokenizer`) as ids of the judge's tokenizer."""
    if judge_tokenizer.sha256 == source_tokenizer.sha256:
        return [[int(t) for t in s if int(t) != PAD_ID] for s in seqs]
    return [judge_tokenizer.encode(source_tokenizer.decode(s)) for s in seqs]


@torch.no_grad()
def judge_nll(judge, seqs: Sequence[Sequence[int]], batch_size: int = 16,
              device: torch.device | str = "cpu") -> tuple[float, int]:
    """(sum of cross-entropy in nats, scored tokens) of `seqs` (judge token ids) under the AR judge."""
    max_len = judge.cfg.data.seq_len
    seqs = [list(s)[:max_len] for s in seqs if len(s) > 0]
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        width = max(len(s) for s in group)
        inp = torch.full((len(group), width + 1), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for r, s in enumerate(group):
            inp[r, 0] = EOS_ID
            inp[r, 1:len(s) + 1] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = True            # right padding: a causal model never sees it before a real token
        inp, mask = inp.to(device), mask.to(device)
        logits = judge.model(inp[:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2), inp[:, 1:], reduction="none")
        total += float((ce * mask).sum())
        count += int(mask.sum())
    return total, count


def generative_perplexity(judge, source_tokenizer, seqs: Sequence[Sequence[int]], batch_size: int = 16,
                          device: torch.device | str = "cpu") -> Optional[dict]:
    """gen PPL of samples (ids of the evaluated model's tokenizer); None when no sample has any token."""
    total, count = judge_nll(judge, judge_tokens(judge.tokenizer, source_tokenizer, seqs), batch_size, device)
    if count == 0:
        return None
    nll = total / count
    return {"gen_ppl": math.exp(nll) if nll < 700 else None, "judge_nll_nats": nll, "judge_tokens": count}
