#!/usr/bin/env python
"""Training throughput and MFU of the real engine (DeepSpeed + model + objective), one rank.

    python benchmarks/bench_train.py                                   # configs/tiny.json on this CPU
    python benchmarks/bench_train.py --config configs/125m.json configs/1b.json --steps 20   # on a GPU
    python benchmarks/bench_train.py --scale gpu --steps 10 --out probe.json    # compare_ar.py's GPU-scale DIMBA

Times `Trainer.train_step` (micro-batches, backward, DeepSpeed step, EMA) after warm-up steps, on random tokens
(the loader is benchmarked separately in bench_data.py and is far faster than any step here) or on real shards
with --shards. MFU = training FLOPs per token (the objective's flops_per_token: Megatron's Mamba-2
count x3 for fwd+bwd, plus logits and the self-conditioning forward) x tokens/s / peak. The peak is
  - CPU: an fp32 1024^3 matmul measured in the same run (so CPU speeds are ratios, not absolute claims);
  - GPU: both the dense bf16 datasheet peak (989 TFLOP/s for H100/H200) and a bf16 8192^3 matmul measured here.

Measured (2-core CPU, fp32, shared machine), configs/tiny.json, micro-batch 16 x 128 tokens:
  see the table printed by the command above; numbers go in the closing notes of the issues.
"""
import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from compare_ar import SCALES

from dimba.config import load_config
from dimba.objectives import OBJECTIVES
from dimba.training.distributed import init_distributed
from dimba.training.engine import GPU_PEAK_FLOPS, measure_matmul_flops
from dimba.training.trainer import Trainer


class RandomTokens:
    """Endless random batches (tokens drawn uniformly, no clean positions)."""

    def __init__(self, vocab: int, batch: int, seq_len: int, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.batch, self.seq_len = vocab, batch, seq_len
        self.counters = {}

    def __iter__(self):
        while True:
            tokens = torch.randint(4, self.vocab, (self.batch, self.seq_len), generator=self.g)
            yield {"tokens": tokens, "clean": torch.zeros_like(tokens, dtype=torch.bool)}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def gpu_matmul_flops(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def bench(config: str, overrides: list[str], steps: int, warmup: int, shards: str | None, info, run_root: Path):
    cfg = load_config(config, overrides + ([f"data.shards={shards}"] if shards else []))
    run_dir = run_root / Path(config).stem
    run_dir.mkdir(parents=True, exist_ok=True)
    if shards:
        from dimba.data.loader import TokenLoader
        loader = TokenLoader(cfg.data, "train", cfg.micro_batch_size, info.rank, info.world_size, cfg.grad_accum)
    else:
        loader = RandomTokens(cfg.model.vocab_size, cfg.micro_batch_size, cfg.data.seq_len)
    trainer = Trainer(cfg, run_dir, info, loader)
    for _ in range(warmup):
        trainer.train_step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    tokens = steps * cfg.grad_accum * cfg.micro_batch_size * cfg.data.seq_len
    tok_s = tokens / seconds
    row = {"config": Path(config).stem, "params_M": trainer.n_params / 1e6, "zero": cfg.zero_stage,
           "precision": "bf16" if trainer.engine.bfloat16_enabled() else "fp32",
           "tokens/step": tokens // steps, "step_s": seconds / steps, "tokens/s": tok_s,
           "TFLOP/s": trainer.flops_per_token * tok_s / 1e12}
    if info.device.type == "cuda":
        name = torch.cuda.get_device_name()
        datasheet = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), float("nan"))
        row["MFU_datasheet"] = trainer.flops_per_token * tok_s / datasheet
        row["MFU_measured"] = trainer.flops_per_token * tok_s / gpu_matmul_flops()
        row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        row["MFU_vs_fp32_matmul"] = trainer.flops_per_token * tok_s / measure_matmul_flops()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=None, help="configs to time (default configs/tiny.json)")
    ap.add_argument("--scale", choices=sorted(SCALES), default=None,
                    help="time a compare_ar.py scale's DIMBA training setup (its config and overrides) instead")
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default=None,
                    help="with --scale: time this objective (default: the scale config's own)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shards", default=None, help="train on these shards instead of random tokens")
    ap.add_argument("--run-root", default="/tmp/dimba-bench-train")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    info = init_distributed()
    if args.scale:
        scale = SCALES[args.scale]
        objective = args.objective or load_config(ROOT / scale.config).objective
        configs = [str(ROOT / scale.config)]
        overrides = [*scale.train, f"objective={objective}", *getattr(scale, objective, []), *args.overrides]
    else:
        configs, overrides = args.config or ["configs/tiny.json"], args.overrides
    rows = [bench(c, overrides, args.steps, args.warmup, args.shards, info, Path(args.run_root)) for c in configs]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("\n" + " | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
    if args.out and info.rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
