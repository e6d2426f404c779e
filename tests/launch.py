"""Helpers the tests use to launch real multi-process DeepSpeed runs on the CPU and read what they wrote."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dimba.training.distributed import deepspeed_command

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_cmd(script: str, args: list[str], ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N script args` (the launcher runs N CPU ranks with gloo on a machine without GPUs)."""
    return deepspeed_command(str(ROOT / script), args, ranks)


def load_script(path: str):
    """A script (benchmarks/compare_ar.py, tools/eval.py) as a module, named after its file and registered in
    sys.modules, so that a script importing its neighbour by name (token_scaling imports compare_ar) finds it
    whichever test file runs first."""
    name = Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(cmd: list[str], timeout: float = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run cmd to the end; past timeout, kill it and every rank it started (its process group), then raise."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s (killed):\n{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in read_metrics(run_dir):
        if "train/loss" in row:
            out.setdefault(row["step"], []).append(row["train/loss"])
    return out


def kill_during_a_save(cmd: list[str], ckpt_dir: Path, timeout: float = 240) -> bool:
    """Run cmd (a training launch) and SIGKILL every process the moment a checkpoint folder exists without
    COMPLETE (mid-save); if no save is caught in the act, at a random moment once 3 folders exist. Returns whether
    the kill hit a save."""
    import random
    import time
    from dimba.training.checkpoint import COMPLETE
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    kill_at = None
    mid_save = False
    while time.time() < deadline and proc.poll() is None:
        steps = [p for p in ckpt_dir.glob("step-*")] if ckpt_dir.exists() else []
        incomplete = [p for p in steps if not (p / COMPLETE).exists() and p.name != "step-00000001"]
        if incomplete:
            mid_save = True
            break
        if len(steps) >= 3 and kill_at is None:
            kill_at = time.time() + random.uniform(0.0, 3.0)
        if kill_at is not None and time.time() >= kill_at:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"killed {'during a save' if mid_save else 'between saves'}; folders: "
          f"{sorted(p.name for p in ckpt_dir.glob('step-*'))}")
    return mid_save
