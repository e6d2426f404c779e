"""Sampling-time levers that are experiments, not shipped options: re-run the rows of benchmarks/levers.md's
"Sampling-time levers" table on a trained comparison (its DIMBA model, shards and the judge).

    python benchmarks/sampling_probes.py runs/compare-cpu-2x --probe clamp-argmax --steps 16,32,64

Probes (all on the unconditional generation rows of compare_ar.py: 32 samples of seq_len tokens, seed 1):
  none                 the model's own sampling config (the report's rows)
  warped[:MIX]         steps uniform in the model's own CE curve (CDCD's warped sampling time): CE by t measured
                       with dimba.objectives.gaussian.denoising.loss_by_t (25 buckets, the first 32 of the comparison's 64
                       likelihood windows), fitted and inverted by dimba.objectives.gaussian.timewarp.LearnedTimeWarp;
                       MIX of uniform t mixed in (default 0)
  clamp-argmax[:T]     Diffusion-LM's clamping: x0_hat <- embedding of its argmax token at every step with t < T
                       (default: every step)
  clamp-sample         x0_hat <- embedding of a token drawn from its logits, every step
  clamp-mean           x0_hat <- softmax(logits) @ table (posterior mean under the linear head's logits), every step
  restart:K:LO:HI:N    restart sampling (Xu et al. 2023): the T-step DDIM (eta 0) pass runs down to t = LO, then
                       K times: x is re-noised by the forward process from LO up to HI with fresh noise and N DDIM
                       steps bring it back to LO; the pass then goes on to 0. T + K * N model calls
The warped grid replaces dimba.objectives.gaussian.sampling.timestep_grid for the run; the clamps wrap the model. Prints one
line per T: gen-PPL under the judge and unigram entropy (bits).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

import compare_ar
import dimba.objectives.gaussian.sampling as sampling
from dimba.objectives.gaussian.timewarp import LearnedTimeWarp
from dimba.objectives.gaussian.denoising import loss_by_t
from dimba.evaluation.judge import load_judge
from dimba.evaluation.textgen import Request, generate
from dimba.objectives.gaussian.schedule import NoiseSchedule
from dimba.evaluation.valdata import val_sequences
from dimba.training.export import load_model_dir

CURVE_BUCKETS, CURVE_WINDOWS, LIK_WINDOWS = 25, 32, 64


class ClampedDenoiser(torch.nn.Module):
    """The DIMBA model with its x0 estimate replaced by a token-level one below t < `below`."""

    def __init__(self, model, mode: str, below: float = 2.0, seed: int = 5):
        super().__init__()
        self.inner, self.cfg, self.mode, self.below = model, model.cfg, mode, below
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def self_condition(self) -> bool:
        return self.inner.self_condition

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(tokens)

    def forward(self, x_t, t, clean, self_cond=None, with_logits=False, **opts):
        x0, logits = self.inner(x_t, t, clean, self_cond, with_logits=True, **opts)
        if float(t[0]) < self.below:
            if self.mode == "argmax":
                x0 = self.inner.embed(logits.argmax(-1))
            elif self.mode == "sample":
                probs = logits.softmax(-1)
                idx = torch.multinomial(probs.view(-1, probs.size(-1)).cpu(), 1, generator=self.generator)
                x0 = self.inner.embed(idx.view(probs.shape[:-1]).to(logits.device))
            else:
                x0 = self.inner.token_embedding(probs=logits.softmax(-1))
        return (x0, logits) if with_logits else x0


def warped_grid_fn(model, cfg, shards: Path, tok, mix: float):
    """A timestep_grid replacement: steps uniform in the normalised, monotone CE-by-t curve of `model`. The curve
    is fitted and inverted by the training-time LearnedTimeWarp (its bins are loss_by_t's equal buckets of t), with
    no uniform floor: F^-1(1 - i / steps)."""
    seq_len = cfg.data.seq_len
    seqs = val_sequences(shards, tok, seq_len, LIK_WINDOWS)[:CURVE_WINDOWS]   # the likelihood section's first 32
    batches = [{"tokens": torch.as_tensor(seqs[i:i + 8]), "clean": torch.zeros(len(seqs[i:i + 8]), seq_len,
                                                                                 dtype=torch.bool)}
               for i in range(0, len(seqs), 8)]
    rows = loss_by_t(model, NoiseSchedule.from_config(cfg.diffusion), cfg.diffusion, batches, cfg.model.pad_id, buckets=CURVE_BUCKETS)
    d = cfg.diffusion
    warp = LearnedTimeWarp(d.t_min, d.t_power, start_step=0, bins=CURVE_BUCKETS, floor=0.0)
    mid = torch.tensor([(r["t_lo"] + r["t_hi"]) / 2 for r in rows])
    tokens = torch.tensor([float(r["tokens"]) for r in rows])
    warp.observe(mid, torch.tensor([r["ce"] for r in rows]) * tokens, tokens)
    warp.update()
    print("CE by t:", " ".join(f"{t:.2f}:{c:.2f}" for t, c in zip(mid.tolist(), warp.curve())))

    def grid(num_steps: int, steps: int, spacing: str = "uniform") -> list[int]:
        g = [round(num_steps * ((1 - mix) * warp.t_of_u(1 - i / steps) + mix * (1 - i / steps)))
             for i in range(steps + 1)]
        g[0], g[-1] = num_steps, 0
        for i in range(steps - 1, -1, -1):          # strictly decreasing, as timestep_grid guarantees
            g[i] = max(g[i], g[i + 1] + 1)
        return g
    return grid


@torch.no_grad()
def restart_sample(model, cfg, n: int, steps: int, restarts: int, lo: float, hi: float, n_restart: int,
                   seed: int = 1) -> torch.Tensor:
    """Unconditional DDIM (eta 0, self-conditioned, as dimba.objectives.gaussian.sampling.sample with the model's own
    sampling config) with restart segments over [lo, hi]; returns (n, seq_len) tokens."""
    schedule, sc_cfg = NoiseSchedule.from_config(cfg.diffusion), cfg.sampling
    g = torch.Generator().manual_seed(seed)
    length, T = cfg.data.seq_len, schedule.num_steps
    clean = torch.zeros(n, length, dtype=torch.bool)
    dt = torch.float64 if sc_cfg.precision == "float64" else torch.float32
    x = torch.randn(n, length, model.cfg.d_embed, generator=g, dtype=dt)
    full, stop = sampling.timestep_grid(T, steps, sc_cfg.spacing), round(lo * T)
    segment = [round(T * (hi - (hi - lo) * i / n_restart)) for i in range(n_restart + 1)]
    plan = ([[v for v in full if v > stop] + [stop]] + [segment] * restarts      # with restarts 0 and lo on the
            + [[stop] + [v for v in full if v < stop]])                          # grid: sample()'s own steps
    steps_in = [(k, step_t, step_s) for k, path in enumerate(plan) for step_t, step_s in zip(path[:-1], path[1:])]
    x0, logits = None, None
    for i, (k, step_t, step_s) in enumerate(steps_in):
        if 0 < k <= restarts and step_t == segment[0]:   # a restart: forward process from lo up to hi, fresh noise
            ab_lo, ab_hi = (schedule.alpha_bar(schedule.step_to_t(v)) for v in (segment[-1], segment[0]))
            z = torch.randn(x.shape, generator=g, dtype=dt)
            x = (ab_hi / ab_lo).sqrt() * x + (1 - ab_hi / ab_lo).sqrt() * z
        t, s = schedule.step_to_t(step_t).to(dt), schedule.step_to_t(step_s).to(dt)
        last = i == len(steps_in) - 1                  # the V-wide logits only where tokens are picked
        out = model(x.float(), torch.full((n,), float(t)), clean,
                    x0.float() if (model.self_condition and x0 is not None) else None, with_logits=last)
        x0, logits = out if last else (out, None)
        x0 = x0.to(dt)
        x = sampling.ddim_update(x, x0, schedule.alpha_bar(t), schedule.alpha_bar(s))
    return sampling.pick_tokens(logits, sc_cfg, g)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a compare_ar.py output folder (its dimba/ run and shards/)")
    ap.add_argument("--probe", default="none")
    ap.add_argument("--steps", default="16,32,64")
    ap.add_argument("--judge", default="smollm2", help="as compare_ar.py's --judge ('none': entropy only)")
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    loaded = load_model_dir(args.out / "dimba")
    cfg, tok, model = loaded.cfg, loaded.tokenizer, loaded.model
    name, _, arg = args.probe.partition(":")
    if name == "warped":
        sampling.timestep_grid = warped_grid_fn(model, cfg, args.out / "shards", tok, float(arg or 0.0))
    elif name.startswith("clamp-"):
        model = ClampedDenoiser(model, name.removeprefix("clamp-"), float(arg) if arg else 2.0)
    elif name == "restart":
        k, lo, hi, n_r = arg.split(":")
    elif name != "none":
        raise SystemExit(f"unknown probe {args.probe!r}; see --help")
    judge = load_judge(args.judge, "cpu") if args.judge != "none" else None
    uncond = [Request(prefix=[], middle_length=cfg.data.seq_len) for _ in range(args.samples)]
    for steps in [int(s) for s in args.steps.split(",")]:
        if name == "restart":
            texts = restart_sample(model, cfg, args.samples, steps, int(k), float(lo), float(hi), int(n_r)).tolist()
        else:
            res, _ = generate(model, cfg, uncond, replace(cfg.sampling, steps=steps), seed=1,
                              batch_size=args.samples)
            texts = [r.middle for r in res]
        q = compare_ar._quality(judge, tok, texts, args.samples)
        print(f"{args.probe} T={steps}: gen-PPL {q.get('gen_ppl', float('nan')):.0f} at "
              f"{q['unigram_entropy_bits']:.2f} bits", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
