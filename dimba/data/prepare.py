"""Your own text in one command: a tokenizer (trained on it unless one is given) and val-split shards.

`prepare_corpus` behind data_prep/prepare.py is train_tokenizer (dimba/data/tokenizer.py)
then run_shard_job (dimba/data/sharding.py) into one folder:

    OUT/tokenizer/tokenizer.model, tokenizer.json   the tokenizer trained on the inputs
    OUT/train-*.tar, val-*.tar, manifest.json, tokenizer.model   the shards, as data_prep/shard.py writes them

The inputs are checked first (files exist, are text), so bad input costs nothing and
changes nothing. A re-run of the same command reuses the trained tokenizer (its
tokenizer.json records the inputs' sha256 and the settings) and resumes the shards.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dimba.data.documents import Format, TextMode, check_text_files, expand_inputs, file_sha256
from dimba.data.errors import DataError
from dimba.data.sharding import ShardJob, run_shard_job
from dimba.data.tokenizer import INFO_NAME, MODEL_NAME, train_tokenizer, training_settings

TOKENIZER_DIR = "tokenizer"


@dataclass
class PrepareJob:
    inputs: list[str]                  # files or globs
    output: str                        # the folder for the tokenizer and the shards
    tokenizer: Optional[str] = None    # reuse this tokenizer.model instead of training one
    vocab_size: int = 4096
    val_fraction: float = 0.05
    shard_tokens: int = 2_000_000
    sample_chars: int = 100_000_000
    workers: int = 0
    fmt: Format = "auto"
    text_mode: TextMode = "blocks"
    text_key: str = "text"
    progress: bool = True
    overwrite: bool = False
    command: str = ""
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


def _trained_tokenizer(job: PrepareJob, inputs: list[Path]) -> Path:
    """OUT/tokenizer/tokenizer.model trained on the inputs: the one there when it was trained on these inputs
    with these settings, else a new one."""
    tok_dir = Path(job.output) / TOKENIZER_DIR
    info_path = tok_dir / INFO_NAME
    if info_path.is_file() and (tok_dir / MODEL_NAME).is_file():
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            info = {}
        settings = training_settings(job.vocab_size, sample_chars=job.sample_chars, fmt=job.fmt,
                                     text_mode=job.text_mode, text_key=job.text_key)
        same = (info.get("settings") == settings
                and info.get("trained_on", {}).get("inputs_sha256") == [file_sha256(p) for p in inputs])
        if same:
            job.log(f"reusing {tok_dir / MODEL_NAME}, trained on these inputs with these settings")
            return tok_dir / MODEL_NAME
        if not job.overwrite:
            raise DataError(f"{tok_dir} holds a tokenizer trained on other inputs or settings; pass --overwrite to "
                            "retrain it (and redo the shards), --tokenizer to use one, or another --output")
    info = train_tokenizer(inputs, job.vocab_size, tok_dir, sample_chars=job.sample_chars, fmt=job.fmt,
                           text_mode=job.text_mode, text_key=job.text_key, command=job.command)
    job.log(f"trained a {info['vocab_size']}-piece tokenizer on {info['trained_on']['documents']:,} documents: "
            f"{tok_dir / MODEL_NAME}")
    return tok_dir / MODEL_NAME


def prepare_corpus(job: PrepareJob) -> dict:
    """Tokenizer (trained unless job.tokenizer) and shards in job.output; returns the shards' manifest."""
    inputs = expand_inputs(job.inputs)
    check_text_files(inputs, job.fmt)
    if not 0.0 <= job.val_fraction < 1.0:         # checked here too: before a tokenizer is trained for nothing
        raise DataError(f"--val-fraction must be in [0, 1), got {job.val_fraction}")
    if job.tokenizer is not None and not Path(job.tokenizer).is_file():
        raise DataError(f"--tokenizer {job.tokenizer} not found; give a tokenizer.model, or leave --tokenizer out "
                        "to train one on the inputs")
    tokenizer = Path(job.tokenizer) if job.tokenizer is not None else _trained_tokenizer(job, inputs)
    return run_shard_job(ShardJob(
        inputs=[str(p) for p in inputs], tokenizer=str(tokenizer), output=job.output, val_fraction=job.val_fraction,
        shard_tokens=job.shard_tokens, workers=job.workers, fmt=job.fmt, text_mode=job.text_mode,
        text_key=job.text_key, progress=job.progress, overwrite=job.overwrite, command=job.command, log=job.log))
