"""What every training objective provides: the small interface the trainer, export, tools and evaluation use.

An objective is one unit (torchtitan's TrainSpec, MDLM's noise-schedule classes). It owns

    build_model()            the heads it puts on the shared backbone (conditioning + the DimbaBlock stack)
    init_model(model, ...)   data-dependent initialisation (e.g. a unigram prior), before the engine wraps it
    loss(model, batch, draw) one micro-batch's loss as a typed LossResult
    observe / after_step     learned state updated from the losses (the Gaussian time warp), in state_dict()
    likelihood(...)          a bound or the exact NLL on held-out windows
    generate(...)            its samplers (`samplers`, the first is the default), on frames of prompt / middle / suffix

and nothing outside dimba/objectives/ asks which objective it runs. The table of objectives is the plain dict in
dimba/objectives/__init__.py.

Randomness: the trainer hands `loss` a `Draw` per micro-batch: one seed per sample, from (training seed, global
sample index) only, and a low-discrepancy uniform per sample, spread over the whole global batch. So a sample's
noise does not depend on how the global batch is split over ranks and accumulation steps, and a resumed run
redraws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn

from dimba.config.core import ConfigError
from dimba.config.schema import Config, SamplingConfig


@dataclass
class LossResult:
    """One micro-batch's loss. `metrics` are detached scalars the trainer averages and logs under their names (the
    first objective-specific ones come first in the log line); `per_sample` are (B,) tensors for the objective's
    own learned state (`observe`), never logged."""
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Draw:
    seeds: list[int]           # one 63-bit seed per sample: its own generator's seed
    u: torch.Tensor            # (B,) float64 in [0, 1): low-discrepancy over the global batch (a time draw)


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for global sample `index` of optimizer step `step` (splitmix64-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


def make_draw(seed: int, first_index: int, batch: int, global_batch: int) -> Draw:
    """The Draw of samples first_index .. first_index + batch - 1 of a run whose optimizer step takes
    `global_batch` samples: sample g's uniform is (offset of its step + (g mod global_batch) / global_batch) mod 1
    (MDLM's low-discrepancy sampler: the step's times cover [0, 1) evenly, whatever the split over ranks)."""
    idx = range(first_index, first_index + batch)
    seeds = [sample_seed(seed, 0, g) for g in idx]
    u = [((sample_seed(seed, 1, g // global_batch) / 2**63) + (g % global_batch) / global_batch) % 1.0 for g in idx]
    return Draw(seeds=seeds, u=torch.tensor(u, dtype=torch.float64))


@dataclass
class Request:
    """Generate `middle_length` tokens between `prefix` and `suffix` (both held clean)."""
    prefix: list[int]
    middle_length: int
    suffix: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prefix) + self.middle_length + len(self.suffix)


def frame(requests: list[Request], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(clean_tokens, clean) (B, L) for requests of one frame length [prefix | middle | suffix]."""
    length = requests[0].length
    tokens = torch.zeros(len(requests), length, dtype=torch.long)
    clean = torch.zeros(len(requests), length, dtype=torch.bool)
    for i, r in enumerate(requests):
        tokens[i, :len(r.prefix)] = torch.tensor(r.prefix, dtype=torch.long)
        clean[i, :len(r.prefix)] = True
        if r.suffix:
            tokens[i, length - len(r.suffix):] = torch.tensor(r.suffix, dtype=torch.long)
            clean[i, length - len(r.suffix):] = True
    return tokens.to(device), clean.to(device)


class Objective(abc.ABC):
    """Base of the objectives; see the module doc. Subclasses set `name`, `samplers` and the abstract methods."""
    name: ClassVar[str] = ""
    samplers: ClassVar[tuple[str, ...]] = ()           # the first is the default
    best_guess_sampler: ClassVar[str] = ""             # the sampler of `best_guess` ("": the configured one)
    uses_suffix: ClassVar[bool] = True                 # False: generation reads the prefix only (AR)
    parallel: ClassVar[bool] = True                    # True: `sampling.steps` denoising passes; False: one per token
    gather_for_sampling: ClassVar[bool] = False        # reads weights outside module forwards (ZeRO-3 must gather)
    summary_file: ClassVar[str] = ""                   # the run directory's JSON of `summary()` (the learned state)
    has_diagnostics: ClassVar[bool] = False            # True: `diagnostics` adds report sections

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ---- model ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The heads on the backbone."""

    def init_model(self, model: nn.Module, unigram_log_probs: Callable[[], Optional[object]]) -> None:
        """Data-dependent initialisation; `unigram_log_probs()` reads the train split's unigram log-probabilities
        (V,) (None: no train split), only if called."""

    @abc.abstractmethod
    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) for MFU."""

    # ---- training ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict, draw: Draw, training: bool = True) -> LossResult:
        """One micro-batch's loss; `training` False for validation (no learned state is used or changed)."""

    def observe(self, result: LossResult) -> None:
        """See each training micro-batch's result (learned state)."""

    def after_step(self, device) -> None:
        """After each optimizer step, on every rank (may be collective)."""

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None:
            raise ConfigError(f"objective {self.name!r} holds no learned state but the checkpoint has some")

    def summary(self) -> Optional[dict]:
        """A JSON summary of the learned state written beside the checkpoints (None: nothing)."""
        return None

    def log_extra(self) -> dict[str, float]:
        return {}

    # ---- sampling ---------------------------------------------------------------------------------------
    def sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        """`sampling` with the default sampler filled in; refuses a sampler of another objective."""
        from dataclasses import replace
        name = sampling.sampler or self.samplers[0]
        if name not in self.samplers:
            raise ConfigError(f"sampler {name!r} does not belong to the {self.name} objective; use one of "
                              f"{', '.join(self.samplers)}")
        return replace(sampling, sampler=name)

    def best_guess(self, sampling: SamplingConfig) -> SamplingConfig:
        """`sampling` made a point estimate (argmax picks, with `best_guess_sampler` where set): what accuracy-type
        scores such as infilling's should decode with, since the argmax maximises the expected number of hits."""
        from dataclasses import replace
        return self.sampling(replace(sampling, sampler=self.best_guess_sampler or sampling.sampler, greedy=True))

    def sample_frame(self, model: nn.Module, tokens: torch.Tensor, clean: torch.Tensor, sampling: SamplingConfig,
                     generator: torch.Generator, device, on_step: Optional[Callable[[int, int], None]] = None
                     ) -> torch.Tensor:
        """Fill the positions not `clean` of (B, L) `tokens`; returns (B, L) tokens (clean ones unchanged). Needed by
        the default `generate`; an objective that only continues a prefix (AR) overrides `generate` instead."""
        raise TypeError(f"the {self.name} objective does not fill frames; it continues prefixes (generate)")

    def generate(self, model: nn.Module, requests: list[Request], sampling: SamplingConfig,
                 generator: torch.Generator, device, on_step: Optional[Callable[[int, int], None]] = None
                 ) -> list[list[int]]:
        """The middles of requests of one frame length, in order."""
        tokens, clean = frame(requests, device)
        out = self.sample_frame(model, tokens, clean, self.sampling(sampling), generator, device, on_step)
        return [out[k, len(r.prefix):len(r.prefix) + r.middle_length].tolist() for k, r in enumerate(requests)]

    def step_counts(self, steps: list[int], length: int) -> list[int]:
        """The sampling step counts an evaluation sweeps (one per token for a sequential model)."""
        return sorted(set(steps)) if self.parallel else [length]

    def with_steps(self, sampling: SamplingConfig, steps: int) -> SamplingConfig:
        from dataclasses import replace
        return self.sampling(replace(sampling, steps=steps) if self.parallel else sampling)

    # ---- evaluation -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def likelihood(self, model: nn.Module, batches: list[dict], t_samples: int, seed: int, device) -> dict:
        """NLL on held-out batches: {"kind", "nll_nats_per_token", "bits_per_token", "ppl", ...}."""

    def diagnostics(self, model: nn.Module, batches: list[dict], prior, opts, device) -> dict:
        """Extra report sections of this objective (name -> JSON-ready value)."""
        return {}
