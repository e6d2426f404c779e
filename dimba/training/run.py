"""Wiring for `launch/train.py`: config -> process group -> run directory -> loaders -> Trainer.fit()."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

from dimba.config.core import ConfigError
from dimba.config.schema import Config, load_config


def default_run_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def check_data(cfg: Config) -> None:
    """Clear errors for data that cannot feed this model, before any process group exists."""
    shards = Path(cfg.data.shards)
    if not (shards / "manifest.json").is_file():
        raise ConfigError(f"data.shards: {shards} has no manifest.json; prepare shards with "
                          "`python data_prep/shard.py --input ... --output DIR` and pass --set data.shards=DIR")


def open_tokenizer(cfg: Config):
    from dimba.data.loader import load_tokenizer
    tok = load_tokenizer(cfg.data)     # checked against the shards' manifest
    if cfg.model.vocab_size == 0:      # unset: the shards decide
        cfg.model.vocab_size = tok.vocab_size
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} but tokenizer {tok.path} has {tok.vocab_size} "
                          f"pieces; set --set model.vocab_size={tok.vocab_size}")
    return tok


def main(config_path: str, run_dir: Optional[str], overrides: list[str]) -> int:
    from dimba.training.stopflag import StopFlag
    stop = StopFlag()
    stop.install()
    from dimba.data.errors import DataError
    try:
        cfg = load_config(config_path, overrides)
        check_data(cfg)
        tokenizer = open_tokenizer(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dimba.data.loader import TokenLoader
    from dimba.training.distributed import init_distributed
    from dimba.training.trainer import Trainer, TrainingStopped

    run_dir = Path(run_dir) if run_dir else default_run_dir(config_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = init_distributed()
    if info.is_main:     # the run keeps its own tokenizer, so converted models and tools never need the shards
        shutil.copyfile(tokenizer.path, run_dir / "tokenizer.model")
    loader = TokenLoader(cfg.data, split="train", batch_size=cfg.micro_batch_size, rank=info.rank,
                         world_size=info.world_size)
    val_loader = None
    if cfg.evaluation.val_every:
        val_loader = TokenLoader(cfg.data, split="val", batch_size=cfg.micro_batch_size, rank=info.rank,
                                 world_size=info.world_size)
    try:
        return Trainer(cfg, run_dir, info, loader, val_loader, tokenizer, stop).fit()
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop.release()
