"""Prompted continuation of held-out text, scored against what really followed.

Each held-out sequence is cut into a prompt (its first `prompt_len` tokens) and the true continuation (the
rest); the model continues the prompt by the same number of tokens (diffusion: the prompt held clean; AR:
recurrent decoding after [BOS, prompt], as `textgen.generate` does for every objective), and the decoded
continuations are compared with the decoded true ones:
  bleu       sacrebleu corpus BLEU, 0-100, default 13a tokenisation
  rouge*_f   rouge-score F-measure (rouge1, rouge2, rougeL), 0-1, Porter stemming, averaged over prompts
  prompt_gain_nats  (with a judge) the judge's NLL of a continuation after another sample's prompt minus after
             its own, per token: how much the continuation follows from its prompt (`prompt_gain`)
Open-ended continuation has many right answers, so both are low even for good models; they are useful to
compare checkpoints and step counts on the same prompts, not as absolute quality.
"""
from __future__ import annotations

from typing import Sequence

import sacrebleu
import torch
from rouge_score import rouge_scorer

from dimba.config.schema import SamplingConfig
from dimba.evaluation.textgen import Request, generate
from dimba.objectives.nll import stderr

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
PROMPT_GAIN_PASSES = 3       # the judge scores every prompt three times: own prompt + continuation, other's, alone


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each."""
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (0-1) over hypothesis/reference pairs."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    sums = {k: 0.0 for k in ROUGE_KEYS}
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)
        for k in ROUGE_KEYS:
            sums[k] += scores[k].fmeasure
    n = max(len(hypotheses), 1)
    return {f"{k}_f": v / n for k, v in sums.items()}


def continue_prompts(model, cfg, tokenizer, sequences: torch.Tensor, prompt_len: int, sampling: SamplingConfig,
                     seed: int = 0, batch_size: int = 16, device: torch.device | str = "cpu",
                     examples: int = 3, judge=None, on_batch=None) -> dict:
    """Continue each sequence's first `prompt_len` tokens by the rest of its length; BLEU/ROUGE vs the truth, and
    with a `judge` the prompt gain (`prompt_gain`). `on_batch(n)`: after each batch of n prompts, and with a judge
    once more with n = PROMPT_GAIN_PASSES x prompts when it has scored them."""
    length = sequences.size(1)
    if not 1 <= prompt_len < length:
        raise ValueError(f"prompt length must be in [1, {length - 1}] for {length}-token sequences, got {prompt_len}")
    requests = [Request(prefix=s[:prompt_len].tolist(), middle_length=length - prompt_len) for s in sequences]
    results, _ = generate(model, cfg, requests, sampling, seed=seed, batch_size=batch_size, device=device,
                          on_batch=on_batch)
    hyps = [tokenizer.decode(r.middle) for r in results]
    refs = [tokenizer.decode(s[prompt_len:]) for s in sequences]
    out = {"prompts": len(requests), "prompt_len": prompt_len, "continuation_len": length - prompt_len,
           "bleu": bleu(hyps, refs), **rouge(hyps, refs)}
    if judge is not None and len(requests) >= 2:
        out.update(prompt_gain(judge, tokenizer, [r.prefix for r in requests], [r.middle for r in results],
                               batch_size))
        if on_batch is not None:
            on_batch(PROMPT_GAIN_PASSES * len(requests))
    out["examples"] = [{"prompt": tokenizer.decode(sequences[i, :prompt_len]), "continuation": hyps[i],
                        "truth": refs[i]} for i in range(min(examples, len(hyps)))]
    return out


def prompt_gain(judge, tokenizer, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                batch_size: int = 16) -> dict:
    """Does the model's continuation depend on its prompt? The judge's NLL of each continuation after another
    sample's prompt (prompt i + 1, cyclically) minus its NLL after its own, per continuation token (nats):

        gain = [sum_i NLL(p_{i+1} + c_i) - sum_i NLL(p_i + c_i)] / (tokens of p_i + c_i - tokens of p_i)

    (the prompts' own NLL cancels: the same prompts appear in both sums). About 0 when the continuation ignores
    its prompt; large when it follows from it. Its standard error is the ratio estimator's over the continuations:
    d_i = [NLL(p_{i+1} + c_i) - NLL(p_{i+1})] - [NLL(p_i + c_i) - NLL(p_i)], continuation i's own difference (the
    d_i sum to the numerator above), n_i its tokens, residuals d_i - gain * n_i. Needs at least 2 prompts."""
    if len(prompts) < 2:
        raise ValueError("the prompt gain needs at least 2 prompts")
    own = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    other = [list(prompts[(i + 1) % len(prompts)]) + list(c) for i, c in enumerate(continuations)]
    per_own = judge.nlls(tokenizer, own, batch_size)
    per_other = judge.nlls(tokenizer, other, batch_size)
    per_prompt = judge.nlls(tokenizer, [list(p) for p in prompts], batch_size)
    k = len(prompts)      # d_i: continuation i's NLL after prompt i + 1 minus after its own, each prompt's NLL taken off
    d_i = [(per_other[i][0] - per_prompt[(i + 1) % k][0]) - (per_own[i][0] - per_prompt[i][0]) for i in range(k)]
    n_i = [per_own[i][1] - per_prompt[i][1] for i in range(k)]
    n_cont = max(sum(n_i), 1)
    gain = sum(d_i) / n_cont
    se = stderr([d - gain * n for d, n in zip(d_i, n_i)]) * k / n_cont
    return {"prompt_gain_nats": gain, "prompt_gain_se": se, "continuation_tokens": n_cont}
