"""The one DIMBA config: a dataclass per section, JSON on disk.

Dotted names (`training.max_steps`, `data.shards`, ...) are the stable names that
`--set` overrides, scripts and the README use. The `deepspeed` section is
DeepSpeed's own config, passed through untouched except for the keys DIMBA
owns (listed in `DEEPSPEED_OWNED_KEYS`), which are filled in from the typed
sections so there is one place for each setting.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from dimba.config.core import ConfigError, apply_overrides, from_dict, require, to_dict

# DeepSpeed keys that DIMBA sets itself from the typed config.
DEEPSPEED_OWNED_KEYS = {
    "optimizer": "training.lr / training.weight_decay / training.betas",
    "scheduler": "training.warmup_steps / training.decay",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "train_batch_size": "deepspeed.train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size",
}


@dataclass
class ModelConfig:
    """The shared backbone (bidirectional or causal Mamba-2 blocks) and the heads' sizes; which heads sit on it is
    the objective's choice (the top-level `objective` field, dimba/objectives/)."""
    vocab_size: int = 0          # 0: the shards' tokenizer's (manifest.json), filled in at launch
    pad_id: int = 0
    mask_id: int = -1            # masked objective: the tokenizer's <mask> id (-1: read from the tokenizer at launch)
    d_model: int = 256
    n_layers: int = 4
    d_embed: int = 64            # Gaussian diffusion space: tokens embed to d_embed, L2-normalised to norm sqrt(d_embed)
    bidirectional: bool = True   # forward + reversed scan per block (False: causal, for ablation and the AR twin)
    conditioning: Literal["film", "additive"] = "film"
    d_cond: int = 0              # width of the conditioning vector (0: same as d_model)
    tie_embeddings: bool = True  # logits = x0_hat . normalised embedding table
    # Gaussian: how the denoiser states x0_hat: "linear" = out_proj's output (logits read it through the table);
    # "softmax" = out_proj's output gives logits, x0_hat = softmax(logits) @ table, a mixture of token embeddings
    # (CDCD's score interpolation, Plaid), exact once the model is sure of a token, which keeps the likelihood bound
    # finite; "posterior" = softmax plus the context-free posterior's own terms, a learned per-token prior and
    # c(t) x_t . table^T, so the network only has to add what the context tells (see dimba/objectives/gaussian/model.py)
    x0_head: Literal["linear", "softmax", "posterior"] = "linear"
    self_condition: bool = True  # Gaussian: the denoiser takes its previous x0 estimate as an extra input
    # Mamba-2 mixer (same names as mamba_ssm.Mamba2)
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    mixer_impl: Literal["auto", "fused", "chunked", "sequential"] = "auto"
    # hybrid denoiser: these blocks mix with multi-head self-attention instead of Mamba-2 (dimba/model/attention.py;
    # mamba_ssm's name); bidirectional backbones only
    attn_layer_idx: tuple[int, ...] = ()
    attn_num_heads: int = 0      # 0: one head per 64 channels of d_model
    norm_eps: float = 1e-5

    def validate(self) -> None:
        require(self.vocab_size >= 0, f"model.vocab_size must be positive (or 0: the shards'), got {self.vocab_size}")
        for name in ("d_model", "n_layers", "d_embed", "d_state", "d_conv", "expand", "headdim",
                     "ngroups", "chunk_size"):
            require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        require(self.pad_id >= 0 and (self.vocab_size == 0 or self.pad_id < self.vocab_size),
                f"model.pad_id must be in [0, vocab_size), got {self.pad_id}")
        require(self.mask_id == -1 or (self.mask_id >= 0 and self.mask_id != self.pad_id
                                       and (self.vocab_size == 0 or self.mask_id < self.vocab_size)),
                f"model.mask_id must be -1 (the tokenizer's <mask>) or an id in [0, vocab_size) other than pad_id, "
                f"got {self.mask_id}")
        d_inner = self.expand * self.d_model
        require(d_inner % self.headdim == 0,
                f"model.expand * model.d_model ({d_inner}) must be a multiple of model.headdim ({self.headdim})")
        require((d_inner // self.headdim) % self.ngroups == 0,
                f"model.ngroups ({self.ngroups}) must divide the number of heads ({d_inner // self.headdim})")
        require(self.d_cond >= 0, f"model.d_cond must be >= 0, got {self.d_cond}")
        require(len(set(self.attn_layer_idx)) == len(self.attn_layer_idx)
                and all(0 <= i < self.n_layers for i in self.attn_layer_idx),
                f"model.attn_layer_idx must list distinct block indices in [0, n_layers = {self.n_layers}), "
                f"got {list(self.attn_layer_idx)}")
        require(not self.attn_layer_idx or self.bidirectional,
                "model.attn_layer_idx needs model.bidirectional true (causal decoding has no key-value cache); "
                "drop it for the AR twin")
        require(self.attn_num_heads >= 0 and self.d_model % self.attn_heads == 0,
                f"model.attn_num_heads ({self.attn_num_heads}) must divide model.d_model ({self.d_model}); "
                f"0 picks d_model // 64")
        require(self.x0_head == "linear" or self.tie_embeddings,
                f"model.x0_head {self.x0_head!r} needs model.tie_embeddings true (x0_hat is a mixture of the tied table)")

    @property
    def cond_dim(self) -> int:
        return self.d_cond or self.d_model

    @property
    def attn_heads(self) -> int:
        return self.attn_num_heads or max(1, self.d_model // 64)


@dataclass
class DiffusionConfig:
    schedule: Literal["cosine", "linear"] = "cosine"
    zero_terminal_snr: bool = True
    num_steps: int = 1000              # T, the discrete grid samplers step on
    mse_weight: float = 1.0            # x0-MSE term
    ce_weight: float = 1.0             # cross-entropy anchor on logits of x0_hat
    self_cond_prob: float = 0.5        # fraction of the batch trained with the model's own detached x0 estimate
    cond_dropout: float = 0.0          # classifier-free guidance: drop prompt/clean conditioning on this fraction
    t_min: float = 1e-3                # training draws t in [t_min, 1] ...
    t_power: float = 1.0               # ... as t = t_min + (1 - t_min) * u ** t_power, u ~ U(0, 1): a fixed time warp;
                                       # < 1 puts more samples at high noise, where text diffusion learns the most
    time_warp: Literal["power", "learned"] = "power"   # learned: t drawn with density ~ dCE/dt, fitted to the loss
                                       # during training (CDCD; dimba/objectives/gaussian/timewarp.py); t_power until warmup ends

    def validate(self) -> None:
        require(self.num_steps >= 1, f"diffusion.num_steps must be >= 1, got {self.num_steps}")
        require(self.mse_weight >= 0 and self.ce_weight >= 0, "diffusion.mse_weight and diffusion.ce_weight must be >= 0")
        require(self.mse_weight + self.ce_weight > 0, "diffusion.mse_weight + diffusion.ce_weight must be > 0")
        require(0 <= self.self_cond_prob <= 1, f"diffusion.self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        require(0 <= self.cond_dropout < 1, f"diffusion.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        require(0 <= self.t_min < 1, f"diffusion.t_min must be in [0, 1), got {self.t_min}")
        require(self.t_power > 0, f"diffusion.t_power must be > 0, got {self.t_power}")


@dataclass
class MaskedConfig:
    """The masked (absorbing-state) objective, MDLM's recipe (dimba/objectives/masked/)."""
    t_eps: float = 1e-3                # t ~ U[t_eps, 1], low-discrepancy over the global batch; alpha_t = 1 - t
    # training times: "uniform" (the NELBO itself) or "logit_normal", t = sigmoid(t_logit_std * Phi^-1(u)), a bell
    # around t = 1/2 with the 1/t weight kept: a reweighted loss that learns faster (Hong et al. 2026,
    # benchmarks/levers.md); validation and the likelihood always use uniform t, so the val loss stays the bound
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    t_logit_std: float = 0.6          # measured best of 0.6 and 1.0 at the CPU scale
    time_conditioning: bool = False    # feed t to the denoiser (MDLM: off; the mask count already tells it)
    cond_dropout: float = 0.0          # classifier-free guidance: mask the prompt/clean positions of this fraction

    def validate(self) -> None:
        require(0 < self.t_eps < 1, f"masked.t_eps must be in (0, 1), got {self.t_eps}")
        require(self.t_logit_std > 0, f"masked.t_logit_std must be > 0, got {self.t_logit_std}")
        require(0 <= self.cond_dropout < 1, f"masked.cond_dropout must be in [0, 1), got {self.cond_dropout}")


@dataclass
class SamplingConfig:
    # "": the objective's default; gaussian: ddim, ddpm; masked: ancestral (MDLM), confidence (LLaDA / MaskGIT:
    # commit the most confident tokens each step); ar: recurrent (the list: dimba.objectives, `tools/sample.py --help`)
    sampler: Literal["", "ddpm", "ddim", "ancestral", "confidence", "recurrent"] = ""
    steps: int = 64
    block_length: int = 0              # masked samplers: semi-autoregressive blocks of this many tokens (0: one)
    eta: float = 0.0                   # DDIM noise (0: deterministic, 1: DDPM-like)
    spacing: Literal["uniform", "quadratic", "trailing"] = "uniform"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False               # argmax at the final step
    guidance: float = 1.0              # classifier-free guidance scale (1: plain conditional)
    x0_temperature: float = 1.0        # softmax/posterior x0 heads: x0_hat = softmax(logits / this) @ table at every
                                       # step (< 1: each step commits more to its likeliest tokens)
    precision: Literal["float32", "float64"] = "float32"

    def validate(self) -> None:
        require(self.steps >= 1, f"sampling.steps must be >= 1, got {self.steps}")
        require(self.block_length >= 0, f"sampling.block_length must be >= 0, got {self.block_length}")
        require(self.eta >= 0, f"sampling.eta must be >= 0, got {self.eta}")
        require(self.temperature > 0, f"sampling.temperature must be > 0, got {self.temperature}")
        require(self.top_k >= 0, f"sampling.top_k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        require(self.guidance >= 0, f"sampling.guidance must be >= 0, got {self.guidance}")
        require(self.x0_temperature > 0, f"sampling.x0_temperature must be > 0, got {self.x0_temperature}")


@dataclass
class CleanMaskConfig:
    """Which tokens of a training sequence stay clean (given, never noised, not in the loss).

    Each sample draws one mode with these probabilities (they must sum to 1);
    lengths are fractions of the sequence length, drawn uniformly from the range.
    """
    none: float = 1.0                                  # unconditional
    prefix: float = 0.0                                # prompt: a clean prefix
    infill: float = 0.0                                # clean prefix and suffix, noisy middle
    spans: float = 0.0                                 # random clean spans anywhere
    prefix_frac: tuple[float, float] = (0.1, 0.5)
    suffix_frac: tuple[float, float] = (0.1, 0.3)
    span_frac: tuple[float, float] = (0.1, 0.5)       # total clean fraction for `spans`
    span_count: tuple[int, int] = (1, 4)

    def validate(self) -> None:
        fracs = (self.none, self.prefix, self.infill, self.spans)
        require(all(f >= 0 for f in fracs), "data.clean fractions (none, prefix, infill, spans) must be >= 0")
        require(abs(sum(fracs) - 1.0) < 1e-6, f"data.clean.none + prefix + infill + spans must sum to 1, got {sum(fracs)}")
        for name in ("prefix_frac", "suffix_frac", "span_frac"):
            lo, hi = getattr(self, name)
            require(0 <= lo <= hi < 1, f"data.clean.{name} must be [lo, hi] with 0 <= lo <= hi < 1, got {[lo, hi]}")
        lo, hi = self.span_count
        require(1 <= lo <= hi, f"data.clean.span_count must be [lo, hi] with 1 <= lo <= hi, got {[lo, hi]}")


@dataclass
class DataConfig:
    shards: str = "data/shards"        # directory written by data_prep/shard.py (manifest.json, train-*.tar, val-*.tar)
    tokenizer: str = ""                # tokenizer.model; empty: the one named in the shards' manifest
    seq_len: int = 256
    num_workers: int = 1               # dataloader worker processes per rank
    shuffle_buffer: int = 1024         # sequences in the seeded shuffle buffer
    seed: int = 1234
    on_corrupt: Literal["skip", "raise"] = "skip"
    clean: CleanMaskConfig = field(default_factory=CleanMaskConfig)

    def validate(self) -> None:
        require(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        require(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


@dataclass
class TrainingConfig:
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1          # final lr = lr * min_lr_ratio
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    ema_decay: float = 0.999           # 0 disables the EMA
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = 500
    keep_last: int = 3
    seed: int = 1234
    max_nonfinite: int = 10            # consecutive non-finite losses before the run stops (after saving)
    compile: bool = False

    def validate(self) -> None:
        require(self.max_steps >= 1, f"training.max_steps must be >= 1, got {self.max_steps}")
        require(self.lr > 0, f"training.lr must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, f"training.weight_decay must be >= 0, got {self.weight_decay}")
        require(all(0 <= b < 1 for b in self.betas), f"training.betas must be in [0, 1), got {list(self.betas)}")
        require(0 <= self.ema_decay < 1, f"training.ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.checkpoint_every >= 1, f"training.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        require(self.keep_last >= 1, f"training.keep_last must be >= 1, got {self.keep_last}")
        require(self.max_nonfinite >= 1, f"training.max_nonfinite must be >= 1, got {self.max_nonfinite}")


@dataclass
class EvaluationConfig:
    val_every: int = 500               # 0 disables periodic validation
    val_batches: int = 8
    sample_every: int = 500            # text samples into tensorboard; 0 disables
    num_samples: int = 2
    sample_length: int = 64

    def validate(self) -> None:
        require(self.val_every >= 0 and self.sample_every >= 0, "evaluation.val_every and evaluation.sample_every must be >= 0")
        require(self.val_batches >= 1, f"evaluation.val_batches must be >= 1, got {self.val_batches}")
        require(self.num_samples >= 1 and self.sample_length >= 1, "evaluation.num_samples and evaluation.sample_length must be >= 1")


@dataclass
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True

    def validate(self) -> None:
        require(self.log_every >= 1, f"logging.log_every must be >= 1, got {self.log_every}")


OBJECTIVE_NAMES = ("gaussian", "masked", "ar")     # dimba/objectives/__init__.py holds the table itself
# each objective's samplers, its default first (the objectives' `samplers`; here so a config is checked on load)
SAMPLERS = {"gaussian": ("ddim", "ddpm"), "masked": ("ancestral", "confidence"), "ar": ("recurrent",)}


@dataclass
class Config:
    # the training objective, and so the heads on the backbone, the loss, the likelihood and the samplers:
    # "gaussian" (the original DIMBA: diffusion over token embeddings), "masked" (absorbing-state diffusion, MDLM)
    # or "ar" (the autoregressive twin: causal backbone, next-token loss)
    objective: Literal["gaussian", "masked", "ar"] = "gaussian"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)      # the Gaussian objective's section
    masked: MaskedConfig = field(default_factory=MaskedConfig)               # the masked objective's section
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: dict = field(default_factory=lambda: {"train_micro_batch_size_per_gpu": 8,
                                                     "gradient_accumulation_steps": 1,
                                                     "gradient_clipping": 1.0,
                                                     "zero_optimization": {"stage": 1}})
    # launch/submit.py's resources (nodes, GPUs, partition, time limit, evaluation jobs); checked there by
    # dimba.cluster.spec.ClusterSpec, ignored by training itself
    cluster: dict = field(default_factory=dict)

    def validate(self) -> None:
        for key, owner in DEEPSPEED_OWNED_KEYS.items():
            require(key not in self.deepspeed, f"deepspeed.{key} is set by DIMBA from {owner}; remove it from the deepspeed section")
        mb = self.deepspeed.get("train_micro_batch_size_per_gpu")
        require(isinstance(mb, int) and mb >= 1,
                f"deepspeed.train_micro_batch_size_per_gpu must be a positive integer, got {mb!r}")
        ga = self.deepspeed.get("gradient_accumulation_steps", 1)
        require(isinstance(ga, int) and ga >= 1, f"deepspeed.gradient_accumulation_steps must be a positive integer, got {ga!r}")
        zero = self.deepspeed.get("zero_optimization", {})
        require(isinstance(zero, dict), f"deepspeed.zero_optimization must be an object such as {{\"stage\": 2}}, "
                                        f"got {zero!r}; set the stage with deepspeed.zero_optimization.stage=N")
        stage = zero.get("stage", 0)
        require(stage in (0, 1, 2, 3), f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        clip = self.deepspeed.get("gradient_clipping", 0.0)
        require(isinstance(clip, (int, float)) and clip >= 0 and math.isfinite(clip),
                f"deepspeed.gradient_clipping must be a number >= 0, got {clip!r}")
        require(self.data.seq_len >= 2, "data.seq_len must be >= 2")
        require(self.sampling.sampler in ("", *SAMPLERS[self.objective]),
                f"sampling.sampler {self.sampling.sampler!r} does not belong to objective {self.objective!r}; use "
                f"one of {', '.join(SAMPLERS[self.objective])} (or leave it empty for the default)")
        if self.objective == "ar":
            require(not self.model.bidirectional,
                    "model.bidirectional must be false with objective 'ar' (it predicts the next token)")
        require(self.evaluation.sample_length <= self.data.seq_len,
                f"evaluation.sample_length ({self.evaluation.sample_length}) must be <= data.seq_len ({self.data.seq_len})")
        require(self.objective != "gaussian" or self.sampling.steps <= self.diffusion.num_steps,
                f"sampling.steps ({self.sampling.steps}) must be <= diffusion.num_steps ({self.diffusion.num_steps})")

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.deepspeed.get("gradient_accumulation_steps", 1))

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


# Model fields of earlier versions: measured and not shipped (benchmarks/levers.md), removed; their defaults are
# what every model had, so a saved config holding them at the default still loads.
REMOVED_MODEL_FIELDS = {"posterior_input": False, "logit_prior": False, "embed_norm": "l2"}


def upgrade_legacy(data: dict) -> dict:
    """A config of an earlier version (model.kind 'dimba' / 'ar' before the `objective` field) in today's form."""
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    model = dict(model)
    if "kind" in model:
        kind = model.pop("kind")
        legacy = {"dimba": "gaussian", "ar": "ar"}
        if kind not in legacy:
            raise ConfigError(f"model.kind is gone: set the top-level objective to 'gaussian', 'masked' or 'ar' "
                              f"(got model.kind {kind!r})")
        data.setdefault("objective", legacy[kind])
    for name, default in REMOVED_MODEL_FIELDS.items():
        if name in model:
            value = model.pop(name)
            if value != default:
                raise ConfigError(f"model.{name} was removed (measured, not shipped: benchmarks/levers.md); "
                                  f"drop it from the config (got {value!r})")
    return {**data, "model": model}


def config_from_dict(data: dict, overrides: Optional[list[str]] = None) -> Config:
    """Typed, validated Config from raw JSON data plus `a.b=value` overrides."""
    data = dict(data)
    if "deepspeed" not in data:   # overrides of deepspeed.* apply on top of the default section, not an empty one
        data["deepspeed"] = Config().deepspeed
    return from_dict(Config, upgrade_legacy(apply_overrides(data, overrides or [])))


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Read a JSON config file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing JSON file such as configs/tiny.json")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?); pass a JSON config such as "
                          "configs/tiny.json") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object with sections model, data, training, ...")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_json())
