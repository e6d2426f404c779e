"""The local Slurm itself: sbatch + srun with two tasks, a gloo rendezvous between them, and submitit on it.

These check the ground the training/eval scripts stand on (slurm/local/start.sh, accounting, srun env), so
a failure here points at the cluster, not at DIMBA's jobs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.slurm_fixture import SlurmCluster

pytestmark = pytest.mark.slurm
# The job functions below are pickled by value: the job process cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

RENDEZVOUS = r"""
import os, sys, datetime
import torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(f"rank={rank} world={world} local={os.environ['SLURM_LOCALID']} sum={t.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def test_sbatch_srun_two_tasks_rendezvous(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "rdv.py"
    script.write_text(RENDEZVOUS)
    batch = tmp_path / "job.sh"
    batch.write_text(
        "#!/bin/bash\n"
        "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)\n"
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
        f"srun --kill-on-bad-exit=1 {sys.executable} {script}\n"
    )
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch("--nodes=1", "--ntasks-per-node=2", "--time=5", f"--output={out}", str(batch))
    assert slurm_cluster.wait(job, timeout=90) == "COMPLETED", out.read_text()
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("rank="))
    assert lines == ["rank=0 world=2 local=0 sum=3", "rank=1 world=2 local=1 sum=3"]


def _rank_info() -> tuple[int, int, str]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks, env.job_id


def _raises() -> None:
    raise ValueError("planned failure from inside the job")


def _sleeps() -> None:
    time.sleep(300)


def _wait_done(job: submitit.Job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            raise TimeoutError(f"submitit job {job.job_id} not done after {timeout}s (cancelled it)")
        time.sleep(1)


def test_submitit_two_tasks_and_errors(slurm_cluster: SlurmCluster) -> None:
    executor = submitit.AutoExecutor(folder=slurm_cluster.folder / "submitit-basic", cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=2, timeout_min=5, slurm_srun_args=["--kill-on-bad-exit=1"])
    ranks = executor.submit(_rank_info)
    executor.update_parameters(tasks_per_node=1)
    failing = executor.submit(_raises)
    sleeping = executor.submit(_sleeps)

    _wait_done(ranks, 90)
    assert sorted(r[:2] for r in ranks.results()) == [(0, 2), (1, 2)]
    assert {r[2] for r in ranks.results()} == {ranks.job_id}

    _wait_done(failing, 90)
    with pytest.raises(submitit.core.utils.FailedJobError, match="planned failure from inside the job"):
        failing.result()

    # A cancelled job has no result file: only accounting tells submitit it is over (no hang).
    slurm_cluster.wait(sleeping.job_id, timeout=60, states={"RUNNING"})
    sleeping.cancel()
    _wait_done(sleeping, 60)
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        sleeping.result()
    assert sleeping.state.startswith("CANCELLED")
