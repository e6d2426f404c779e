"""DeepSpeed engine from the config: model, AdamW with decay/no-decay groups, warmup+decay LR, ZeRO, precision.

The user's `deepspeed` section is passed to DeepSpeed as is; DIMBA adds only the keys it owns (bf16 from
training.precision) and quiet defaults for logging keys the user did not set. The optimizer and LR schedule are
ours (torch AdamW, `lr_factor`) and handed to `deepspeed.initialize`, which steps, saves and restores them.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from dimba.config.schema import Config
from dimba.data.shards import unigram_log_probs
from dimba.training.distributed import DistInfo
from dimba.training.lr import lr_factor

# Dense bf16 peak per GPU (torchtitan / llm-foundry figures); a large bf16 matmul reaches about 790 TFLOP/s
# on H100/H200 in practice (report against both: see benchmarks/bench_train.py).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device for MFU: the table for known GPUs; on CPU a measured fp32 matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 0.0
    return measure_matmul_flops()


def measure_matmul_flops(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n matmul on this CPU (best of `repeats`): the yardstick CPU speeds are quoted against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, the (normalised) token table, or parameters that
    mamba_ssm marks `_no_weight_decay` (A_log, D, dt_bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or getattr(p, "_no_weight_decay", False) or name.startswith("token_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: Config, use_bf16: bool) -> dict:
    ds = copy.deepcopy(cfg.deepspeed)
    ds["bf16"] = {"enabled": use_bf16}
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.training.precision == "auto":
        return device.type == "cuda"
    return cfg.training.precision == "bf16"


def build_engine(cfg: Config, info: DistInfo, objective):
    """(engine, module): the DeepSpeed engine and the model of `objective` it wraps (same seed on every rank)."""
    import deepspeed

    torch.manual_seed(cfg.training.seed)
    model = objective.build_model()
    # data-dependent init (resume overwrites it)
    objective.init_model(model, lambda: unigram_log_probs(cfg.data.shards, cfg.model.vocab_size, cfg.model.pad_id))
    bf16 = use_bf16(cfg, info.device)
    model.to(info.device)
    kwargs = {"lr": cfg.training.lr, "betas": tuple(cfg.training.betas), "eps": cfg.training.eps}
    if info.device.type == "cuda":
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(param_groups(model, cfg.training.weight_decay), **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.training))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, bf16))
    return engine, engine.module


def model_state_memory(cfg: Config, model: nn.Module, gpus_per_node: int = 8, nodes: int = 1) -> float:
    """DeepSpeed's estimate of model-state memory per GPU (weights, gradients, optimizer states; no activations)
    in bytes, for the config's ZeRO stage, without offload. Works on a meta-device model."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from dimba.model.build import count_parameters

    total = count_parameters(model)
    if cfg.zero_stage == 3:
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        _, gpu = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes, cpu_offload=False,
                                                       cpu_offload_params=False, zero_init=False)
        return float(gpu)
    if cfg.zero_stage in (1, 2):
        # ZeRO-1 partitions optimizer states like ZeRO-2 but keeps full gradients: add them back.
        _, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=False)
        return float(gpu + (2 * total if cfg.zero_stage == 1 else 0))
    return float(16 * total)
