"""The Python API: load a model, write text.

    from dimba import load
    m = load("runs/tiny/model")                      # a converted folder, a run directory or a checkpoint folder
    m.generate("Alice was", length=32, steps=32)[0].text
    m.generate("The King", suffix="said the Hatter.", length=12)         # infilling (diffusion models)
    m.generate(["It was", "She said"], num_samples=2, seed=3)            # batches of prompts, reproducible

Sampling options are the config's `sampling` section (`sampler`, `steps`, `temperature`, `top_k`, `top_p`,
`guidance`, `block_length`, ...), given as keywords; the model's objective checks that the sampler is one of its
own (`Model.samplers`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from dimba.config.core import ConfigError
from dimba.config.schema import SamplingConfig
from dimba.evaluation.textgen import Request, generate
from dimba.training.export import LoadedModel, load_model_dir

_SAMPLING = {f.name for f in fields(SamplingConfig)}


@dataclass
class Sample:
    text: str                    # prompt + generated middle + suffix, decoded together
    middle: str                  # the generated text alone
    tokens: list[int]            # the generated ids
    prompt: str = ""
    suffix: str = ""


class Model:
    """A loaded DIMBA model (any objective) with its tokenizer; see the module doc."""

    def __init__(self, loaded: LoadedModel, device: str):
        self.loaded, self.device = loaded, device
        self.cfg, self.tokenizer = loaded.cfg, loaded.tokenizer
        self.objective = loaded.objective

    @property
    def samplers(self) -> tuple[str, ...]:
        return tuple(self.objective.samplers)

    def generate(self, prompt: str | Sequence[str] = "", length: int = 64, suffix: Optional[str] = None,
                 num_samples: int = 1, seed: int = 0, batch_size: int = 16, **sampling) -> list[Sample]:
        """`num_samples` continuations of each prompt (or infillings between prompt and `suffix`), in order."""
        unknown = set(sampling) - _SAMPLING
        if unknown:
            raise ConfigError(f"unknown sampling option {sorted(unknown)[0]!r}; use one of {', '.join(sorted(_SAMPLING))}")
        if length < 1 or num_samples < 1 or batch_size < 1:
            raise ConfigError("length, num_samples and batch_size must be >= 1")
        samp = self.objective.sampling(replace(self.cfg.sampling, **sampling))
        samp.validate()
        if suffix and not self.objective.uses_suffix:
            raise ConfigError(f"an {self.objective.name} model cannot read a suffix; it continues the prompt only")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tok = self.tokenizer
        tail = tok.encode(suffix) if suffix else []
        requests = [Request(tok.encode(p), length, tail) for p in prompts for _ in range(num_samples)]
        results, _ = generate(self.loaded.model, self.cfg, requests, samp, seed, batch_size, self.device)
        return [Sample(text=tok.decode(r.request.prefix + r.middle + r.request.suffix), middle=tok.decode(r.middle),
                       tokens=r.middle, prompt=p, suffix=suffix or "")
                for r, p in zip(results, [p for p in prompts for _ in range(num_samples)])]


def load(path: str | Path, device: Optional[str] = None, weights: str = "ema") -> Model:
    """A model from a converted folder (tools/convert.py), a training run directory or a checkpoint folder.
    Raises ModelLoadError, in one line, for anything else."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Model(load_model_dir(path, device, weights), device)
