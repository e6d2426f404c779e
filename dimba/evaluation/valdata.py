"""Held-out sequences for evaluation: the val split of a shard directory, checked against the model's tokenizer.

Sequences come from the same loader as training's validation (`TokenLoader(split="val")`: one pass in file
order, no shuffling, so the same shards give the same sequences every time), cut at the model's seq_len, with
no clean positions (every token is scored), and spread evenly over the split.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dimba.config.schema import CleanMaskConfig, DataConfig
from dimba.data.errors import DataError
from dimba.data.loader import TokenLoader
from dimba.data.shards import read_manifest
from dimba.evaluation.errors import EvalError


def check_shards_match(shards: str | Path, tokenizer) -> None:
    """The shards must have been made with the model's tokenizer (same pieces, same ids)."""
    try:
        manifest = read_manifest(shards)
    except DataError as e:
        raise EvalError(f"--data {shards}: {e}") from None
    made_with = manifest.data["tokenizer"].get("sha256")
    if manifest.vocab_size != tokenizer.vocab_size or (made_with and made_with != tokenizer.sha256):
        raise EvalError(f"--data {shards} was tokenized with another tokenizer ({manifest.vocab_size} pieces, "
                        f"sha256 {str(made_with)[:12]}) than the model's ({tokenizer.vocab_size} pieces, sha256 "
                        f"{tokenizer.sha256[:12]}); shard the text with the model's tokenizer.model "
                        "(data_prep/shard.py --tokenizer)")


def val_sequences(shards: str | Path, tokenizer, seq_len: int, count: int) -> torch.Tensor:
    """Up to `count` val sequences of `seq_len` tokens, (N, seq_len) int64; fewer if the val split is smaller.

    The windows are spread evenly over the whole val split (every k-th window, k = the split's windows / count),
    not its first `count`: the split is in file order, so its first windows come from the first few documents
    (measured: an AR model scored PPL 86 on the first 64 windows of 128 tokens and 46 on all 512)."""
    check_shards_match(shards, tokenizer)
    val_tokens = sum(info.tokens for info in read_manifest(shards).split("val"))
    stride = max(1, val_tokens // seq_len // max(count, 1))   # the loader yields at least val_tokens // seq_len
    cfg = DataConfig(shards=str(shards), seq_len=seq_len, num_workers=0, clean=CleanMaskConfig(none=1.0))
    try:
        loader = TokenLoader(cfg, split="val", batch_size=1)
        rows = []
        for i, batch in enumerate(loader):
            if i % stride == 0:
                rows.append(batch["tokens"][0])
                if len(rows) >= count:
                    break
    except DataError as e:
        raise EvalError(f"--data {shards}: {e}") from None
    if not rows:
        raise EvalError(f"--data {shards}: the val split holds no sequence of {seq_len} tokens; "
                        "use a larger --val-fraction when sharding or a smaller --seq-len")
    return torch.stack(rows)


def as_batches(tokens: torch.Tensor, batch_size: int) -> list[dict]:
    """Batches in the loader's format (tokens, clean), all positions noisy."""
    return [{"tokens": tokens[i:i + batch_size], "clean": torch.zeros_like(tokens[i:i + batch_size], dtype=torch.bool)}
            for i in range(0, len(tokens), batch_size)]
