"""Wiring for `launch/train.py`: config -> checks -> process group -> loaders -> Trainer.fit().

Exit codes: 0 finished, or stopped by SIGUSR1/SIGTERM after saving (Slurm requeues it); 130 stopped by Ctrl-C
after saving; 2 a bad input (config, data, tokenizer), refused before anything is written; 1 a refused restart
or a failure. A failure after start-up ends this process at once (`exit_on_error`): the other ranks see the broken
connection and end too, and status.json says `failed` with the error's one line.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from dimba.config.core import ConfigError
from dimba.config.schema import Config, load_config


def default_run_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def check_data(cfg: Config, world_size: Optional[int] = None) -> None:
    """Clear errors for data that cannot feed this model, before any process group exists; with `world_size`,
    also that each split fills one batch per rank and accumulation step."""
    shards = Path(cfg.data.shards)
    if not (shards / "manifest.json").is_file():
        raise ConfigError(f"data.shards: {shards} has no manifest.json; prepare shards with "
                          "`python data_prep/shard.py --input ... --output DIR` and pass --set data.shards=DIR")
    if world_size is not None:
        from dimba.data.loader import epoch_plan
        epoch_plan(cfg.data, "train", cfg.micro_batch_size, world_size * cfg.grad_accum)
        if cfg.evaluation.val_every:
            epoch_plan(cfg.data, "val", cfg.micro_batch_size, world_size)


def open_tokenizer(cfg: Config):
    """The run's tokenizer, checked against the model config; fills in model.mask_id from its <mask> piece when
    the objective needs one and the config leaves it unset (-1)."""
    from dimba.data.loader import load_tokenizer
    tok = load_tokenizer(cfg.data)     # checked against the shards' manifest
    if cfg.model.vocab_size == 0:      # unset: the shards decide
        cfg.model.vocab_size = tok.vocab_size
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} but tokenizer {tok.path} has {tok.vocab_size} "
                          f"pieces; set --set model.vocab_size={tok.vocab_size}")
    if cfg.objective == "masked":      # the [MASK] id must be one no text encodes to: the tokenizer's <mask>
        mask_id = getattr(tok, "mask_id", None)
        if mask_id is None:
            raise ConfigError(f"the masked objective needs a [MASK] id and tokenizer {tok.path} has no <mask> "
                              "piece; add one with `python data_prep/train_tokenizer.py --add-mask` (then reshard)")
        if cfg.model.mask_id >= 0 and cfg.model.mask_id != mask_id:
            raise ConfigError(f"model.mask_id is {cfg.model.mask_id} but tokenizer {tok.path} has <mask> at "
                              f"{mask_id}; set model.mask_id={mask_id} (or -1: the tokenizer's)")
        cfg.model.mask_id = mask_id
    return tok


def main(config_path: str, run_dir: Optional[str], overrides: list[str]) -> int:
    from dimba.training.stopflag import StopFlag
    stop = StopFlag()
    stop.install()
    started = time.time()
    from dimba.data.errors import DataError
    from dimba.training.checkpoint import resume_refusal
    from dimba.training.distributed import resolve_env
    first_rank = (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"
    try:
        cfg = load_config(config_path, overrides)
        world_size = int(resolve_env()["WORLD_SIZE"])
        check_data(cfg, world_size)
        tokenizer = open_tokenizer(cfg)
    except (ConfigError, DataError, RuntimeError) as e:
        if first_rank:                                    # every rank sees the same: one line is enough
            print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(run_dir) if run_dir else default_run_dir(config_path)
    try:
        refusal = resume_refusal(run_dir, cfg.to_dict(), world_size, tokenizer.path)
    except (OSError, ValueError, KeyError) as e:
        refusal = f"cannot read the run directory {run_dir} ({type(e).__name__}: {e}); fix it or use a new --run-dir"
    if refusal:
        if first_rank:
            print(f"error: {refusal}", file=sys.stderr)
        return 1
    from dimba.data.loader import TokenLoader
    from dimba.training.distributed import exit_on_error, init_distributed, one_line, peer_lost, shutdown
    from dimba.training.status import record_failure
    from dimba.training.trainer import Trainer, TrainingStopped

    run_dir.mkdir(parents=True, exist_ok=True)
    info, loaders = None, []
    try:
        info = init_distributed()
        loader = TokenLoader(cfg.data, split="train", batch_size=cfg.micro_batch_size, rank=info.rank,
                             world_size=info.world_size, accumulation=cfg.grad_accum)
        loaders.append(loader)
        val_loader = None
        if cfg.evaluation.val_every:
            val_loader = TokenLoader(cfg.data, split="val", batch_size=cfg.micro_batch_size, rank=info.rank,
                                     world_size=info.world_size)
            loaders.append(val_loader)
        code = Trainer(cfg, run_dir, info, loader, val_loader, tokenizer, stop).fit()
    except TrainingStopped as e:     # raised on every rank at the same point (collective decision): a clean exit
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except BaseException as e:       # anything else, on any rank, at any point: end this process now
        rank = info.rank if info is not None else int(os.environ.get("RANK", 0))
        echo = peer_lost(e)
        if echo:
            e = RuntimeError(f"{echo}: {one_line(e)}")
            time.sleep(1.0)         # let the rank where it started record the cause first (record_failure)
        try:
            record_failure(run_dir, f"rank {rank}: {one_line(e)}", started)
        except BaseException:   # e.g. the full disk itself: the error line still goes out
            pass
        known = echo or isinstance(e, (ConfigError, DataError, OSError, KeyboardInterrupt))   # else a bug: traceback
        exit_on_error(e, rank, 130 if isinstance(e, KeyboardInterrupt) else 1, show_traceback=not known)
    stop.release()
    for lo in loaders:
        lo.close()
    shutdown()
    return code
