#!/usr/bin/env python
"""Generation speed: Gaussian and masked DIMBA at T denoising steps against the equal-parameter AR twin decoding the
same tokens.

    python benchmarks/bench_generate.py                          # configs/tiny.json pair on this CPU (fp32)
    python benchmarks/bench_generate.py --scale gpu              # the comparison's GPU-scale pair (bf16 on CUDA)
    python benchmarks/bench_generate.py --config configs/125m.json --batch 1 64 --out runs/bench-generate.json

Latency does not depend on the weights, so the models are built at random init from the config (both DIMBA
objectives) and `dimba.objectives.ar_twin` (the AR twin): the speed half of benchmarks/compare_ar.py without
training. The masked sampler skips a step's forward when the step reveals nothing (MDLM's caching), so at random
init, where reveals are uniform, its latency is what a trained model's is. Timing is `dimba.evaluation.speed.time_generation` (one warm-up, median of --repeats, the device
synchronised around each batch; the final token pick runs on the device for both). DIMBA runs T full bidirectional
passes over the whole length; the AR twin one recurrent step per token (eager PyTorch, `Mamba2.step`, no CUDA
graphs). On a CPU the table also gives an fp32 matmul measured in the same run: quote CPU speeds as ratios to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from compare_ar import SCALES
from dimba.config import load_config
from dimba.data.tokenizer import MASK_ID
from dimba.model.build import count_parameters
from dimba.objectives import ar_twin, build_model
from dimba.model.mamba2 import fused_description
from dimba.training.engine import measure_matmul_flops
from dimba.evaluation.speed import ar_speedup, speed_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_pair(config: str, overrides: list[str], device: str, dtype: torch.dtype) -> dict:
    """{'gaussian' | 'masked' | 'ar': (model, cfg)} at random init, in eval mode on `device` in `dtype`."""
    cfg = load_config(config, overrides + ["objective=gaussian"])
    twin, _, _ = ar_twin(cfg)
    masked = dataclasses.replace(cfg, objective="masked", model=dataclasses.replace(cfg.model, mask_id=MASK_ID))
    pair = {}
    for kind, c in (("gaussian", cfg), ("masked", masked), ("ar", twin)):
        torch.manual_seed(0)
        pair[kind] = (build_model(c).to(device=device, dtype=dtype).eval(), c)
    return pair


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default=None,
                    help="the model pair, T values, length and batches of a compare_ar.py scale")
    ap.add_argument("--config", default=None, help="a DIMBA config (default configs/tiny.json)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="DIMBA's T values (default 8 16 32 64 128)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 64)")
    ap.add_argument("--length", type=int, default=None, help="tokens generated per sample (default 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", default=None, help="write the rows and the setup as JSON here")
    args = ap.parse_args()

    scale = SCALES[args.scale] if args.scale else SCALES["cpu"]
    config = args.config or str(ROOT / scale.config)
    overrides = ([o for o in scale.train if o.startswith("model.")] if args.scale else []) + args.overrides
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    steps = args.steps or scale.steps
    batches = args.batch or scale.speed_batches
    length = args.length or scale.speed_length

    pair = build_pair(config, overrides, args.device, dtype)
    on_cpu = torch.device(args.device).type == "cpu"
    setup = {"device": torch.cuda.get_device_name(args.device) if not on_cpu else "cpu",
             "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "mixer": fused_description(),
             "config": config, "overrides": overrides, "length": length, "repeats": args.repeats,
             "parameters": {k: count_parameters(m) for k, (m, _) in pair.items()},
             "layers": {k: c.model.n_layers for k, (_, c) in pair.items()}}
    if on_cpu:
        setup["fp32_matmul_gflops"] = measure_matmul_flops() / 1e9
    print(json.dumps(setup), flush=True)
    rows = ar_speedup(speed_rows(pair, steps, batches, length, args.repeats, args.device))

    print(f"\n{setup['device']}, {setup['dtype']}, {length} tokens per sample; mixer: {setup['mixer']}")
    print(f"gaussian {setup['parameters']['gaussian']:,} parameters, masked {setup['parameters']['masked']:,} "
          f"({setup['layers']['gaussian']} bidirectional layers), "
          f"ar {setup['parameters']['ar']:,} ({setup['layers']['ar']} layers)"
          + (f"; fp32 matmul {setup['fp32_matmul_gflops']:.0f} GFLOP/s" if on_cpu else ""))
    print(f"{'model':<8} {'T':>5} {'batch':>6} {'latency s':>10} {'tokens/s':>10} {'AR latency / this':>18}")
    for r in rows:
        print(f"{r['model']:<8} {r['steps']:>5} {r['batch']:>6} {r['latency_s']:>10.4f} {r['tokens_per_s']:>10.0f} "
              f"{r['ar_over_this']:>18.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
