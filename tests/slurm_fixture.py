"""A real one-node Slurm for the tests marked `slurm`.

`slurm_cluster` (session scope) runs slurm/local/start.sh once — it installs Slurm, munge and MariaDB with apt
when they are missing (root, Debian/Ubuntu) and turns accounting on, because submitit reads job states from
`sacct` and never sees a cancelled or failed job without it. At the end of the session it runs
slurm/local/stop.sh, unless Slurm was already up before the session or DIMBA_SLURM_KEEP=1 (faster reruns).

Enable with `pytest_plugins = ["tests.slurm_fixture"]` in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START = REPO / "slurm" / "local" / "start.sh"
STOP = REPO / "slurm" / "local" / "stop.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def _run(cmd: list[str], timeout: float = 30) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


@dataclass
class SlurmCluster:
    """Handle on the local Slurm: submit with sbatch, read job states, wait with a deadline."""

    folder: Path  # fresh per test session: submitit folders and job logs go below it

    def sbatch(self, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
        """Submit (`sbatch --parsable ARGS`) from `cwd`; returns the job id."""
        full_env = dict(os.environ, **(env or {}))
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=full_env, capture_output=True,
                             text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job left memory."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return {}
        fields = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def state(self, job_id: str) -> str:
        fields = self.job(job_id)
        if fields:
            return fields["JobState"]
        rows = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"]).split()
        return rows[0].split()[0] if rows else "UNKNOWN"

    def wait(self, job_id: str, timeout: float, states: set[str] = TERMINAL) -> str:
        """Poll until the job reaches one of `states`; on timeout cancel it and fail with its state."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], timeout=30)
        raise TimeoutError(f"slurm job {job_id} still {state} after {timeout:.0f}s (cancelled it)")

    def run_cmd(self, cmd: list[str]) -> str:
        """Run a Slurm command (scontrol, scancel, ...); raises with its stderr if it fails."""
        return _run(cmd)

    def sacct_states(self, job_id: str, settle: float = 60) -> dict[str, str]:
        """Job and step states from accounting, e.g. {'7': 'COMPLETED', '7.batch': ..., '7.0': ...}.

        slurmctld hands a job's end to slurmdbd asynchronously, so right after scontrol reports it finished
        accounting may still read RUNNING: poll for up to `settle` seconds until every row is terminal."""
        deadline = time.monotonic() + settle
        while True:
            rows = _run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State"]).splitlines()
            states = {r.split("|")[0]: r.split("|")[1] for r in rows if r}
            settled = states and all(s.split()[0] in TERMINAL for s in states.values())
            if settled or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


# Settings that make configs/tiny.json train in seconds on two CPU ranks (tests only).
TINY = ["model.d_model=64", "model.n_layers=2", "data.seq_len=32", "evaluation.sample_length=32",
        "deepspeed.train_micro_batch_size_per_gpu=4", "evaluation.sample_every=0", "logging.log_every=5"]


# tools/eval.py's measuring options shrunk to seconds on a CPU
EVAL_TINY = ["batches=1", "batch_size=2", "t_samples=2", "t_buckets=2", "steps=2", "samples=2", "prompts=2",
             "gen_batch=2", "speed_repeats=1", "examples=1"]


def read_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file in the run's tensorboard folder: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, dict[int, float]] = {}
    for path in sorted(tb_dir.glob("**/events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name not in ("scalars", "") or v.HasField("image"):
                    continue   # text, images
                value = v.tensor.float_val[0] if v.HasField("tensor") and v.tensor.float_val else v.simple_value
                out.setdefault(v.tag, {})[event.step] = value
    return out


@pytest.fixture(scope="session")
def slurm_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards of the bundled corpus (data_prep/), several train shards so two ranks each get some."""
    out = tmp_path_factory.mktemp("shards")
    cmd = [sys.executable, str(REPO / "data_prep" / "shard.py"), "--input", str(REPO / "data_prep" / "corpus" / "*.txt"),
           "--tokenizer", str(REPO / "data_prep" / "tokenizer" / "tokenizer.model"), "--output", str(out),
           "--val-fraction", "0.05", "--shard-tokens", "50000", "--workers", "1", "--no-progress"]
    _run(cmd, timeout=300)
    return out


def _slurmctld_running() -> bool:
    pid_file = Path("/run/slurmctld.pid")
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> SlurmCluster:
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.skip("slurm tests need root (to install and start a local Slurm) or a running Slurm")
    was_running = _slurmctld_running()
    env = dict(os.environ, SLURM_ACCOUNTING="1")
    out = subprocess.run(["bash", str(START)], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"slurm/local/start.sh failed:\n{out.stdout}\n{out.stderr}")
    cluster = SlurmCluster(folder=tmp_path_factory.mktemp("slurm"))
    yield cluster
    if not was_running and os.environ.get("DIMBA_SLURM_KEEP") != "1":
        subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=300)
