"""Helpers the tests use to launch real multi-process DeepSpeed runs on the CPU and read what they wrote."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dimba.training.distributed import deepspeed_command

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_cmd(script: str, args: list[str], ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N script args` (the launcher runs N CPU ranks with gloo on a machine without GPUs)."""
    return deepspeed_command(str(ROOT / script), args, ranks)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in read_metrics(run_dir):
        if "train/loss" in row:
            out.setdefault(row["step"], []).append(row["train/loss"])
    return out
