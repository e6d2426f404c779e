"""Checkpoints: DeepSpeed's own files plus DIMBA's client state, complete-or-ignored, last K kept.

Layout of a run directory:
    RUN_DIR/config.json                       resolved config of the run
    RUN_DIR/checkpoints/step-00000100/        one checkpoint (the DeepSpeed tag is the folder name)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed (module + optimizer, any ZeRO stage)
        ema.safetensors                       full fp32 EMA (gathered; loads on any world size)
        state.json                            step, tokens seen, per-rank loader states, counters, config
        rng-rank00000.json                    RNG states of each rank
        COMPLETE                              written last, after every rank finished
        universal/                            DeepSpeed's universal form of the step (made when it is resumed on
                                              another number of ranks; the files above stay as they were)
    RUN_DIR/checkpoints/latest                tag of the newest COMPLETE checkpoint (what DeepSpeed's tools read)

A process that dies while saving leaves a folder without COMPLETE: it is never resumed from, and the next
save of the same step, or the clean-up at start-up, removes it. Only complete checkpoints count towards keep_last.

Fault injection for tests: DIMBA_TEST_ENOSPC=<file name> makes every `_atomic_write` of a file of that name raise
ENOSPC, as a full disk would (e.g. state.json: rank 0 fails mid-save while the other ranks wait at a barrier).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"
RUN_TOKENIZER = "tokenizer.model"
IMPLEMENTATION_ONLY = {"mixer_impl", "chunk_size"}   # model fields that may change on resume (same weights)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked (the message says what to do)."""


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_deepspeed_load() -> Iterator[None]:
    """Within the block, every torch.load (DeepSpeed's included) runs with weights_only=True and only DeepSpeed's
    plain checkpoint classes allowed, so a tampered checkpoint cannot execute code."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with warnings.catch_warnings():      # a foreign file's pickle protocol: the refusal below says it all
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:       # torch's message advises weights_only=False: the unsafe way
            why = next((ln.strip().rstrip(".") for ln in str(e).splitlines() if "nsupported" in ln), "unsafe content")
            raise CheckpointError(f"{f} holds objects a weights-only load refuses ({why}): "
                                  "it was tampered with or not written by DeepSpeed, and was not loaded; use another "
                                  "checkpoint") from None
        except (EOFError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):
                raise
            raise CheckpointError(f"{f} is unreadable (truncated or corrupt: {str(e).split('. ')[0]}); use an "
                                  "earlier checkpoint") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    if os.environ.get("DIMBA_TEST_ENOSPC") == path.name:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (DIMBA_TEST_ENOSPC)", str(path))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """Newest complete checkpoint: the one named in `latest` if complete, else the newest COMPLETE folder."""
    ckpt_dir = Path(ckpt_dir)
    named = ckpt_dir / "latest"
    if named.is_file():
        cand = ckpt_dir / named.read_text().strip()
        if (cand / COMPLETE).is_file():
            done = complete_checkpoints(ckpt_dir)
            return max([cand] + done, key=lambda p: p.name)
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def remove_incomplete(ckpt_dir: Path) -> list[str]:
    """Delete step folders without COMPLETE (left by a process killed while saving). Rank 0 only."""
    removed = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.is_dir() and p.name.startswith("step-") and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def rng_state() -> dict:
    state = {"python": repr(random.getstate()), "torch": torch.get_rng_state().tolist()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    import ast
    random.setstate(ast.literal_eval(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(engine, run_dir: Path, step: int, state: dict[str, Any], ema_state: Optional[dict],
                    keep_last: int, rank: int) -> Path:
    """Collective: every rank calls it. `state` must already hold every rank's loader state (gathered)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0:
        if path.exists():               # an incomplete save of this step from a killed run, or a re-save
            shutil.rmtree(path)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    _atomic_write(path / f"rng-rank{rank:05d}.json", json.dumps(rng_state()))
    if rank == 0:
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(path / "ema.safetensors"))
        _atomic_write(path / "state.json", json.dumps(state, indent=1))
    dist.barrier()
    if rank == 0:
        _atomic_write(path / COMPLETE, "")
        _atomic_write(ckpt_dir / "latest", tag)
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def to_universal(path: Path) -> Path:
    """PATH/universal: the checkpoint in DeepSpeed's universal form (every parameter's fp32 weights and optimizer
    state whole, loadable on any number of ranks), made once by ds_to_universal, then renamed into place."""
    from types import SimpleNamespace
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    out = Path(path) / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    tmp = out.with_name(f"{UNIVERSAL}.tmp{os.getpid()}")
    for stale in Path(path).glob(f"{UNIVERSAL}*"):            # an incomplete conversion of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    args = SimpleNamespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()         # its banner and progress bars
    try:
        with safe_deepspeed_load(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"DeepSpeed could not convert checkpoint {path} to its universal form "
                              f"({type(e).__name__}: {e}); resume on the number of ranks that wrote it") from e
    (tmp / COMPLETE).write_text("")
    os.replace(tmp, out)
    return out


def load_checkpoint(engine, path: Path, rank: int, reshard: bool = False) -> tuple[dict, Optional[dict]]:
    """Load DeepSpeed state into `engine` and return (DIMBA state, full EMA state or None). Collective. reshard:
    the checkpoint was written by another number of ranks; its universal form is loaded (rank 0 makes it)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); resume from another one")
    load_dir, tag = path.parent, path.name
    if reshard:
        failure = None
        if rank == 0:
            try:
                to_universal(path)
            except CheckpointError as e:
                failure = str(e)
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        if failures[0]:
            raise CheckpointError(failures[0])
        load_dir, tag = path, UNIVERSAL
    configured = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = reshard     # DeepSpeed reads it from its config only
    try:
        with safe_deepspeed_load():
            load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = configured
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng-rank{rank:05d}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    ema_file = path / "ema.safetensors"
    ema = load_file(str(ema_file)) if ema_file.is_file() else None
    return state, ema


def resume_refusal(run_dir: Path, config: dict, world_size: int, tokenizer_path: Optional[Path]) -> Optional[str]:
    """Why this run may not continue RUN_DIR (None: it may), from files alone, before anything is written: the
    tokenizer in use must be the run's (RUN_DIR/tokenizer.model and the sha256 its checkpoints record), and the
    newest complete checkpoint must hold the same objective and model (`config`: this run's config as a dict), and
    the same global batch and micro-batch (on any number of ranks). tokenizer_path None (a trainer without a
    tokenizer, in tests) skips the tokenizer checks."""
    from dimba.config.core import ConfigError
    from dimba.config.schema import config_from_dict
    run_dir = Path(run_dir)
    sha = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest() if tokenizer_path is not None else None
    run_tok = run_dir / RUN_TOKENIZER
    if sha is not None and run_tok.is_file():
        run_sha = hashlib.sha256(run_tok.read_bytes()).hexdigest()
        if run_sha != sha:
            return (f"run directory {run_dir} was trained with tokenizer {run_tok} (sha256 {run_sha[:12]}) but this "
                    f"run uses {tokenizer_path} (sha256 {sha[:12]}); train with the run's tokenizer and its shards, "
                    "or use a new --run-dir")
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        return None
    saved = json.loads((path / "state.json").read_text())
    try:
        was_cfg = config_from_dict(saved["config"])            # an earlier version's config, upgraded
        was = was_cfg.to_dict()
    except ConfigError as e:
        return f"checkpoint {path} was written with a config this version cannot read ({e}); use a new --run-dir"
    if was["objective"] != config["objective"]:
        return (f"checkpoint {path} was trained with objective {was['objective']!r}, this config says "
                f"{config['objective']!r}; use a new --run-dir or set objective={was['objective']}")
    model = config["model"]
    diff = [k for k, v in was["model"].items() if k not in IMPLEMENTATION_ONLY and model.get(k) != v]
    if diff:
        return (f"checkpoint {path} was written by a different model (model.{diff[0]} differs); "
                "use a new --run-dir or the same model config")
    batch = _batch_refusal(path, was_cfg, saved["world_size"], config_from_dict(config), world_size)
    if batch:
        return batch
    made_with = saved.get("tokenizer_sha256")
    if made_with and sha is not None and made_with != sha:
        return (f"checkpoint {path} was trained with a tokenizer of sha256 {made_with[:12]} but this run uses "
                f"{tokenizer_path} (sha256 {sha[:12]}); train with the run's tokenizer, or use a new --run-dir")
    return None


def _batch_refusal(path: Path, was, saved_world: int, now, world: int) -> Optional[str]:
    """Why the data order or the step cannot continue on this run's batch layout (None: it can). The ranks may
    change; the global batch and the micro-batch may not (they fix the data order: dimba/data/plan.py)."""
    was_micro, now_micro = was.micro_batch_size, now.micro_batch_size
    was_global = was_micro * was.grad_accum * saved_world
    now_global = now_micro * now.grad_accum * world
    if was_micro == now_micro and was_global == now_global:
        return None
    layout = (f"checkpoint {path} was trained with a global batch of {was_global} ({saved_world} ranks x micro-batch "
              f"{was_micro} x {was.grad_accum} accumulation steps), this run's is {now_global} ({world} x {now_micro} "
              f"x {now.grad_accum})")
    lanes = was_global // was_micro
    if lanes % world:
        return (f"{layout}; its {lanes} micro-batches per step cannot be shared out over {world} ranks: resume on a "
                f"number of ranks that divides {lanes} (with deepspeed.gradient_accumulation_steps = {lanes} / ranks "
                "and the same micro-batch), or use a new --run-dir")
    return (f"{layout}; resume with deepspeed.train_micro_batch_size_per_gpu={was_micro} and "
            f"deepspeed.gradient_accumulation_steps={lanes // world}, or use a new --run-dir")


def write_run_files(run_dir: Path, config_json: str, tokenizer_path: Optional[Path]) -> None:
    """RUN_DIR/config.json and the run's own copy of its tokenizer (so converted models and tools never need the
    shards), each replaced atomically. Called once every start-up check has passed."""
    run_dir = Path(run_dir)
    _atomic_write(run_dir / "config.json", config_json)
    tok = run_dir / RUN_TOKENIZER
    if tokenizer_path is None:
        return
    if not tok.is_file() or tok.read_bytes() != Path(tokenizer_path).read_bytes():
        tmp = tok.with_name(f"{tok.name}.tmp{os.getpid()}")
        shutil.copyfile(tokenizer_path, tmp)
        os.replace(tmp, tok)
