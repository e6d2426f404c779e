"""Prompted continuation of held-out text, scored against what really followed.

Each held-out sequence is cut into a prompt (its first `prompt_len` tokens) and the true continuation (the
rest); the model continues the prompt by the same number of tokens (DIMBA: one diffusion pass with the prompt
held clean; AR: recurrent decoding after [BOS, prompt], as `textgen.generate` does for both), and the decoded
continuations are compared with the decoded true ones:
  bleu       sacrebleu corpus BLEU, 0-100, default 13a tokenisation
  rouge*_f   rouge-score F-measure (rouge1, rouge2, rougeL), 0-1, Porter stemming, averaged over prompts
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

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


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
                     examples: int = 3) -> dict:
    """Continue each sequence's first `prompt_len` tokens by the rest of its length; BLEU/ROUGE vs the truth."""
    length = sequences.size(1)
    if not 1 <= prompt_len < length:
        raise ValueError(f"prompt length must be in [1, {length - 1}] for {length}-token sequences, got {prompt_len}")
    requests = [Request(prefix=s[:prompt_len].tolist(), middle_length=length - prompt_len) for s in sequences]
    results, stats = generate(model, cfg, requests, sampling, seed=seed, batch_size=batch_size, device=device)
    hyps = [tokenizer.decode(r.middle) for r in results]
    refs = [tokenizer.decode(s[prompt_len:]) for s in sequences]
    out = {"prompts": len(requests), "prompt_len": prompt_len, "continuation_len": length - prompt_len,
           "bleu": bleu(hyps, refs), **rouge(hyps, refs)}
    out["examples"] = [{"prompt": tokenizer.decode(sequences[i, :prompt_len]), "continuation": hyps[i],
                        "truth": refs[i]} for i in range(min(examples, len(hyps)))]
    return out
