"""From a training run to one portable model folder, and loading any model folder back.

    convert_checkpoint(run_dir_or_checkpoint, out_dir, weights="ema"|"raw", dtype="fp32"|"bf16")
        -> out_dir/model.safetensors + config.json + tokenizer.model
    load_model_dir(path) -> LoadedModel(cfg, model, tokenizer, step, run_dir)
        path: a converted folder, a run directory (its newest complete checkpoint) or one checkpoint folder

Raw weights are consolidated from DeepSpeed's fp32 optimizer partitions (any ZeRO stage, any world size) with
DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`; the EMA comes from the checkpoint's ema.safetensors.
Nothing is unpickled freely: DeepSpeed's files are read through `torch.load(weights_only=True)` with only the
three plain DeepSpeed classes they contain allow-listed (`safe_deepspeed_load`).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dimba.config.core import ConfigError
from dimba.config.schema import Config, config_from_dict
from dimba.model.build import count_parameters
from dimba.objectives import OBJECTIVES, build_model, get_objective
from dimba.training.checkpoint import COMPLETE, CheckpointError, latest_checkpoint, safe_deepspeed_load

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"


class ModelLoadError(RuntimeError):
    """A model folder or checkpoint that cannot be used as asked; the message says what to do."""


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint folder from a run directory or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; pass a run directory, a checkpoint folder or a converted model folder")
    if (path / COMPLETE).is_file():
        return path
    if path.name.startswith("step-") and path.is_dir():
        raise ModelLoadError(f"checkpoint {path} is incomplete (its save was interrupted); use an earlier one")
    ckpt = latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        if (path / CONFIG_FILE).is_file() and not (path / "checkpoints").is_dir():
            raise ModelLoadError(f"{path} has {CONFIG_FILE} but no {MODEL_FILE}: an incomplete converted model; "
                                 f"convert the checkpoint again with tools/convert.py")
        raise ModelLoadError(f"{path} holds no complete checkpoint (no checkpoints/step-*/{COMPLETE}) and no "
                             f"{MODEL_FILE}; pass a run directory, a checkpoint folder or a converted model folder")
    return ckpt


def checkpoint_state(ckpt: Path) -> dict:
    """The checkpoint's state.json (DIMBA's own state: config, step, tokenizer sha256, ...)."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict) or "config" not in state or "step" not in state:
            raise ValueError("no config or step in it")
        return state
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"checkpoint {ckpt} has no readable state.json ({type(e).__name__}: {e}); "
                             "use an earlier checkpoint") from None


def checkpoint_config(ckpt: Path) -> tuple[Config, int]:
    state = checkpoint_state(ckpt)
    try:
        return config_from_dict(state["config"]), int(state["step"])
    except ConfigError as e:
        raise ModelLoadError(f"checkpoint {ckpt / 'state.json'}: {e}") from None


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or corrupt file is a one-line ModelLoadError saying `what` to do."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path} is unreadable (truncated or corrupt: {e}); {what}") from None


def checkpoint_weights(ckpt: Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a checkpoint: its EMA, or the raw (optimizer fp32) weights."""
    if weights == "ema":
        ema = ckpt / "ema.safetensors"
        if not ema.is_file():
            raise ModelLoadError(f"checkpoint {ckpt} has no EMA (training.ema_decay was 0); use --weights raw")
        return read_safetensors(ema, "use an earlier checkpoint, or --weights raw")
    if weights != "raw":
        raise ModelLoadError(f"--weights must be ema or raw, got {weights!r}")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        chatter = io.StringIO()                  # its banner and progress bar
        with safe_deepspeed_load(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    return {k: v.float().contiguous() for k, v in state.items()}


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent


def find_tokenizer(ckpt: Path, cfg: Config) -> Path:
    """The run's copy of its tokenizer (written at training start), else the one the config names; either must
    be the tokenizer the checkpoint was trained with (the sha256 its state.json records, when it does)."""
    path = _run_dir_of(ckpt) / TOKENIZER_FILE
    if not path.is_file():
        from dimba.data.loader import load_tokenizer
        try:
            path = Path(load_tokenizer(cfg.data).path)
        except Exception as e:
            raise ModelLoadError(f"cannot find the tokenizer of {ckpt}: {e}") from None
    made_with = checkpoint_state(ckpt).get("tokenizer_sha256")
    _check_tokenizer_sha(path, made_with, f"checkpoint {ckpt / 'state.json'}")
    return path


def _check_tokenizer_sha(path: Path, made_with: Optional[str], what: str) -> None:
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if made_with and made_with != sha:
        raise ModelLoadError(f"tokenizer {path} (sha256 {sha[:12]}) is not the one the model was trained with "
                             f"({what} records sha256 {made_with[:12]}); use the model's own tokenizer.model")


def convert_checkpoint(src: Path, out_dir: Path, weights: str = "ema", dtype: str = "fp32") -> Path:
    """Write out_dir/{model.safetensors, config.json, tokenizer.model}; returns out_dir."""
    if dtype not in ("fp32", "bf16"):
        raise ModelLoadError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    ckpt = resolve_checkpoint(src)
    cfg, step = checkpoint_config(ckpt)
    state = checkpoint_weights(ckpt, weights)
    _check_architecture(cfg, state, str(ckpt))
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = find_tokenizer(ckpt, cfg)
    meta = {"step": str(step), "weights": weights, "objective": cfg.objective, "source": str(ckpt),
            "tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest()}
    save_file({k: v.to(torch_dtype).contiguous() for k, v in state.items()}, str(out_dir / MODEL_FILE), metadata=meta)
    (out_dir / CONFIG_FILE).write_text(cfg.to_json())
    shutil.copyfile(tokenizer, out_dir / TOKENIZER_FILE)
    return out_dir


def _shapes(cfg: Config) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def _layout(shapes: dict) -> set[str]:
    """Parameter names with block indices folded (an objective's layout, whatever its depth)."""
    return {re.sub(r"blocks\.\d+\.", "blocks.*.", k) for k in shapes}


def _check_architecture(cfg: Config, state: dict, source: str) -> None:
    try:
        expected = _shapes(cfg)
    except ConfigError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        for name in OBJECTIVES:            # weights of another objective's model under this config's sizes?
            other = replace(cfg, objective=name, model=replace(cfg.model, bidirectional=name != "ar",
                                                                 mask_id=max(cfg.model.mask_id, 0)))
            if name != cfg.objective and _layout(_shapes(other)) == _layout(got):
                raise ModelLoadError(f"weights in {source} are a {name!r} model but its config says objective "
                                     f"{cfg.objective!r}; use the config it was trained with")
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shape = [k for k in expected if k in got and expected[k] != got[k]]
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                  else f"{shape[0]} is {got[shape[0]]}, the config says {expected[shape[0]]}")
        raise ModelLoadError(f"weights in {source} do not fit the model its config describes ({detail}); "
                             "they belong to another architecture")


@dataclass
class LoadedModel:
    cfg: Config
    model: nn.Module
    tokenizer: object
    step: int
    run_dir: Optional[Path]

    @property
    def objective(self):
        """The model's objective (its samplers, likelihood and generation)."""
        return get_objective(self.cfg)

    def describe(self, path: str = "") -> dict:
        """What a report says about this model (loaded from `path`)."""
        m = self.cfg.model
        return {"path": path, "objective": self.cfg.objective, "step": self.step, "parameters": count_parameters(self.model),
                "d_model": m.d_model, "n_layers": m.n_layers, "vocab_size": m.vocab_size,
                "trained_seq_len": self.cfg.data.seq_len, "trained_on": self.cfg.data.shards,
                "tokenizer_sha256": self.tokenizer.sha256}


def load_model_dir(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> LoadedModel:
    """Model + config + tokenizer from a converted folder, a run directory or a checkpoint folder (eval mode)."""
    from dimba.data.errors import DataError
    from dimba.data.tokenizer import Tokenizer
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        if not (path / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{path} has {MODEL_FILE} but no {CONFIG_FILE}; convert the checkpoint again with tools/convert.py")
        try:
            cfg = config_from_dict(json.loads((path / CONFIG_FILE).read_text()))
        except (ConfigError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path / CONFIG_FILE} is not a DIMBA config: {e}") from None
        from safetensors import safe_open
        state = read_safetensors(path / MODEL_FILE, "convert the checkpoint again with tools/convert.py")
        with safe_open(str(path / MODEL_FILE), "pt") as f:
            meta = f.metadata() or {}
        step = int(meta.get("step", 0))
        tok_path, source, run_dir = path / TOKENIZER_FILE, str(path / MODEL_FILE), None
    else:
        ckpt = resolve_checkpoint(path)
        cfg, step = checkpoint_config(ckpt)
        state = checkpoint_weights(ckpt, weights)
        tok_path, source, run_dir = find_tokenizer(ckpt, cfg), str(ckpt), _run_dir_of(ckpt)
    _check_architecture(cfg, state, source)
    try:
        tokenizer = Tokenizer(tok_path)
    except DataError as e:
        raise ModelLoadError(str(e)) from None
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ModelLoadError(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model was trained with "
                             f"model.vocab_size={cfg.model.vocab_size}; use the tokenizer the model was trained with")
    if run_dir is None:      # a converted folder (a checkpoint's tokenizer was checked by find_tokenizer)
        _check_tokenizer_sha(tok_path, meta.get("tokenizer_sha256"), str(path / MODEL_FILE))
    model = build_model(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.to(device).eval()
    return LoadedModel(cfg=cfg, model=model, tokenizer=tokenizer, step=step, run_dir=run_dir)
