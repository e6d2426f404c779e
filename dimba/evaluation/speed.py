"""Generation speed: wall-clock latency of one batch of unconditional samples, and tokens per second.

One untimed warm-up batch of the same shape (allocator, kernel selection and autotuning; for DIMBA one
denoising step, which runs every kernel the timed batches run), then `repeats` timed batches; the median is reported
(the minimum too). On a GPU the device is synchronised before and after each batch so the time covers the work,
not just its launch. Everything `textgen.generate` does is inside the timing: for DIMBA, `steps` denoiser calls
(one per step: self-conditioning reuses the previous step's estimate) plus the final token pick; for the AR
twin, one recurrent step and one token pick per token. Both pick tokens on the model's device.
"""
from __future__ import annotations

import statistics
import time

import torch

from dimba.config.schema import SamplingConfig
from dimba.evaluation.textgen import Request, generate
from dimba.objectives import get_objective


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model, cfg, sampling: SamplingConfig, batch_size: int, length: int, repeats: int = 3,
                    seed: int = 0, device: torch.device | str = "cpu", on_batch=None) -> dict:
    """latency_s (median of `repeats`), latency_min_s, tokens_per_s = batch_size * length / latency_s.
    `on_batch(1)`: after the warm-up and after each timed batch (outside the timing)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    requests = [Request(prefix=[], middle_length=length) for _ in range(batch_size)]
    objective = get_objective(cfg)
    warm = objective.with_steps(sampling, 1) if objective.parallel else sampling
    generate(model, cfg, requests, warm, seed=seed, batch_size=batch_size, device=device)   # warm-up
    tick = on_batch or (lambda n: None)
    tick(1)
    times = []
    for r in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        generate(model, cfg, requests, sampling, seed=seed + 1 + r, batch_size=batch_size, device=device)
        _sync(device)
        times.append(time.perf_counter() - t0)
        tick(1)
    latency = statistics.median(times)
    return {"batch": batch_size, "length": length, "repeats": repeats, "latency_s": latency,
            "latency_min_s": min(times), "tokens_per_s": batch_size * length / latency, "device": str(device)}


def speed_rows(models: dict, dimba_steps: list[int], batches: list[int], length: int, repeats: int = 3,
               device: torch.device | str = "cpu", log=print) -> list[dict]:
    """The speed comparison: for each batch size, each diffusion model at each number of steps T and the AR twin
    decoding the same `length` tokens. `models` maps a name to (model, cfg); rows carry model and steps (AR:
    `length`)."""
    rows = []
    for batch in batches:
        for kind, (model, cfg) in models.items():
            objective = get_objective(cfg)
            for steps in objective.step_counts(dimba_steps, length):
                samp = objective.with_steps(cfg.sampling, steps)
                r = time_generation(model, cfg, samp, batch, length, repeats, 0, device)
                rows.append({"model": kind, "steps": steps, **r})
                log(f"[speed] {kind} T={steps} batch {batch}: {r['latency_s']:.3f} s, {r['tokens_per_s']:.0f} tokens/s")
    return rows


def ar_speedup(rows: list[dict]) -> list[dict]:
    """Each row with `ar_over_this`: the AR twin's latency at the same batch size over this row's."""
    ar = {r["batch"]: r["latency_s"] for r in rows if r["model"] == "ar"}
    return [{**r, "ar_over_this": ar[r["batch"]] / r["latency_s"] if r["batch"] in ar else float("nan")}
            for r in rows]
