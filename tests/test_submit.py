"""launch/submit.py and dimba/cluster: submitit training + per-checkpoint evaluation, on Slurm and locally."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dimba.cluster.spec import ClusterSpec, ClusterSpecError
from tests.slurm_fixture import EVAL_TINY, REPO, TINY, SlurmCluster, read_json, read_scalars

def submit(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def tiny_args(shards: Path, run_dir: Path, cluster: str, max_steps: int, *extra: str) -> list[str]:
    sets = [*TINY, f"data.shards={shards}", f"training.max_steps={max_steps}", "training.checkpoint_every=10",
            "training.keep_last=10"]
    args = ["--config", "configs/tiny.json", "--run-dir", str(run_dir), "--cluster", cluster, "--gpus-per-node", "0",
            "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--eval-gpus", "0", "--eval-cpus", "1",
            "--eval-time", "10", "--poll", "1", "--timeout", "240"]
    for kv in sets:
        args += ["--set", kv]
    for kv in EVAL_TINY:
        args += ["--eval-set", kv]
    return args + list(extra)   # after the defaults: a --set here wins


def check_evaluations(run_dir: Path, steps: list[int]) -> None:
    """A JSON report per checkpoint, the summary, and the metrics in the run's tensorboard at each step."""
    tags = [f"step-{s:08d}" for s in steps]
    summary = read_json(run_dir / "eval" / "summary.json")
    assert sorted(summary) == tags, summary
    for tag, step in zip(tags, steps):
        report = read_json(run_dir / "eval" / f"{tag}.json")
        assert report["model"]["step"] == step and "likelihood" in report, report
        assert summary[tag]["step"] == step
    scalars = read_scalars(run_dir / "tb")
    eval_tags = {t: v for t, v in scalars.items() if t.startswith("eval/")}
    assert "eval/nll_nats_per_token" in eval_tags, f"no evaluation scalars in {run_dir / 'tb'}: {sorted(scalars)}"
    for tag, by_step in eval_tags.items():
        assert sorted(by_step) == steps, (tag, by_step)
        for tag_ckpt, step in zip(tags, steps):
            assert by_step[step] == pytest.approx(summary[tag_ckpt][tag]), (tag, step)


# ---- Slurm ----------------------------------------------------------------------------------------------------

@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_training_with_periodic_evaluation(slurm_cluster: SlurmCluster, slurm_shards: Path,
                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = submit(tiny_args(slurm_shards, run_dir, "slurm", 30, "--wait"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training finished: step 30/30" in out.stdout
    check_evaluations(run_dir, [10, 20, 30])
    jobs = read_json(run_dir / "jobs.json")
    assert slurm_cluster.state(jobs["train"]) == "COMPLETED"
    assert slurm_cluster.state(jobs["watch"]) == "COMPLETED"
    watch_log = (run_dir / "submitit" / f"{jobs['watch']}_0_log.out").read_text()
    eval_ids = re.findall(r"evaluation job (\d+)", watch_log)
    assert len(eval_ids) == 3 and len(set(eval_ids) | {jobs["train"], jobs["watch"]}) == 5
    assert [slurm_cluster.state(j) for j in eval_ids] == ["COMPLETED"] * 3


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_training_requeued_on_submitit_signal_resumes(slurm_cluster: SlurmCluster, slurm_shards: Path,
                                                            tmp_path: Path) -> None:
    """SIGUSR2 is submitit's pre-timeout signal: rank 0 has every rank save, then submitit requeues the job."""
    run_dir = tmp_path / "run"
    args = tiny_args(slurm_shards, run_dir, "slurm", 40, "--no-eval", "--set", "data.seq_len=64",
                     "--set", "deepspeed.train_micro_batch_size_per_gpu=8")
    out = submit(args)
    assert out.returncode == 0, out.stdout + out.stderr
    job = read_json(run_dir / "jobs.json")["train"]
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step-00000010" / "COMPLETE").exists():
        assert time.monotonic() < deadline and slurm_cluster.state(job) in ("PENDING", "RUNNING")
        time.sleep(0.2)
    slurm_cluster.run_cmd(["scancel", "--signal=USR2", job])
    assert slurm_cluster.wait(job, timeout=240) == "COMPLETED"
    assert int(slurm_cluster.job(job)["Restarts"]) == 1
    status = read_json(run_dir / "status.json")
    assert status["state"] == "finished" and status["step"] == 40
    log = (run_dir / "submitit" / f"{job}_0_log.out").read_text()
    stopped = re.findall(r"stopping at step (\d+) on SIGUSR1", log)
    assert len(stopped) == 1
    assert re.findall(r"resumed from \S+step-(\d+) at step (\d+)", log) == [(f"{int(stopped[0]):08d}", stopped[0])]
    assert read_json(run_dir / "checkpoints" / "step-00000040" / "state.json")["tokens_seen"] == 40 * 8 * 64 * 2
    follow = submit(["--follow", str(run_dir), "--timeout", "60"])
    assert follow.returncode == 0 and "training finished: step 40/40" in follow.stdout, follow.stderr


@pytest.mark.slurm
def test_slurm_failing_training_is_a_clear_error(slurm_cluster: SlurmCluster, slurm_shards: Path,
                                                 tmp_path: Path) -> None:
    """A run directory holding another model's checkpoint: every rank refuses to resume; no hang."""
    run_dir = tmp_path / "run"
    first = submit(tiny_args(slurm_shards, run_dir, "slurm", 10, "--no-eval", "--wait"))
    assert first.returncode == 0, first.stdout + first.stderr
    start = time.monotonic()
    second = submit(tiny_args(slurm_shards, run_dir, "slurm", 20, "--no-eval", "--wait", "--set", "model.d_model=96"))
    assert second.returncode == 1, second.stdout + second.stderr
    assert time.monotonic() - start < 120
    job = read_json(run_dir / "jobs.json")["train"]
    assert f"training job {job} failed" in second.stderr
    assert "was written by a different model (model.d_model differs)" in second.stderr
    assert slurm_cluster.state(job) == "FAILED"


# ---- local (no Slurm) ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_cluster_runs_the_same_flow(slurm_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = submit(tiny_args(slurm_shards, run_dir, "local", 20))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training finished: step 20/20" in out.stdout
    check_evaluations(run_dir, [10, 20])


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_local_training_requeued_on_timeout_signal_resumes(slurm_shards: Path, tmp_path: Path) -> None:
    """Under --cluster local, submitit's controller sends SIGUSR2 to every task before the time limit; here we
    send it ourselves mid-run. Rank 0 has every rank save, all tasks exit for a requeue, the controller starts
    them again and training resumes at the step it stopped at."""
    run_dir = tmp_path / "run"
    args = tiny_args(slurm_shards, run_dir, "local", 40, "--no-eval", "--set", "data.seq_len=64",
                     "--set", "deepspeed.train_micro_batch_size_per_gpu=8")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "submit.py"), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step-00000010" / "COMPLETE").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        controller = int(read_json(run_dir / "jobs.json")["train"])
        tasks = children(controller)
        assert len(tasks) == 2
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "training finished: step 40/40" in stdout
    log = (run_dir / "submitit" / f"{controller}_0_log.out").read_text()
    stopped = re.findall(r"stopping at step (\d+) on SIGUSR1", log)
    assert len(stopped) == 1, log
    assert re.findall(r"resumed from \S+step-(\d+) at step (\d+)", log) == [(f"{int(stopped[0]):08d}", stopped[0])]
    assert read_json(run_dir / "checkpoints" / "step-00000040" / "state.json")["tokens_seen"] == 40 * 8 * 64 * 2


def test_local_failure_is_a_clear_error(slurm_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)   # a checkpoint DeepSpeed cannot read
    (run_dir / "checkpoints" / "step-00000010" / "COMPLETE").write_text("")
    (run_dir / "checkpoints" / "step-00000010" / "state.json").write_text(json.dumps({"config": {"model": {}}}))
    start = time.monotonic()
    out = submit(tiny_args(slurm_shards, run_dir, "local", 20, "--no-eval"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert time.monotonic() - start < 120
    assert "training failed on rank" in out.stderr and "with exit code 1" in out.stderr


# ---- command line and settings (no jobs) ---------------------------------------------------------------------

def test_bad_settings_fail_before_submitting(slurm_shards: Path, tmp_path: Path) -> None:
    out = submit(["--config", "configs/tiny.json", "--run-dir", str(tmp_path / "r"), "--cluster", "local",
                  "--set", "training.max_steps=-3"])
    assert out.returncode == 2 and "training.max_steps" in out.stderr
    assert not (tmp_path / "r").exists()
    out = submit(["--config", "configs/tiny.json", "--cluster", "local", "--nodes", "2",
                  "--set", f"data.shards={slurm_shards}"])
    assert out.returncode == 2 and "cluster.nodes must be 1 with cluster 'local'" in out.stderr
    out = submit(["--config", str(tmp_path / "missing.json")])
    assert out.returncode == 2 and "cannot read config" in out.stderr
    cfg = json.loads((REPO / "configs" / "tiny.json").read_text())
    cfg["cluster"] = {"gpus": 8}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = submit(["--config", str(tmp_path / "c.json")])
    assert out.returncode == 2 and "unknown cluster setting(s) gpus" in out.stderr
    out = submit(["--config", "configs/tiny.json", "--cluster", "local", "--set", f"data.shards={tmp_path}"])
    assert out.returncode == 2 and f"data.shards: {tmp_path} has no manifest.json" in out.stderr


def test_cluster_spec_from_config_section_and_overrides() -> None:
    spec = ClusterSpec.from_dict({"nodes": 4, "gpus_per_node": 8, "partition": "gpu"}, partition="big", nodes=None)
    assert (spec.nodes, spec.ranks_per_node, spec.partition) == (4, 8, "big")
    assert ClusterSpec(gpus_per_node=0).ranks_per_node == 1
    with pytest.raises(ClusterSpecError, match="tasks_per_node .4. must equal cluster.gpus_per_node .8."):
        ClusterSpec(gpus_per_node=8, tasks_per_node=4)
    with pytest.raises(ClusterSpecError, match="signal_delay_s .600. must be shorter than the time limit .5 min."):
        ClusterSpec(time_min=5, signal_delay_s=600)
    with pytest.raises(ClusterSpecError, match="cluster must be one of slurm, local"):
        ClusterSpec(cluster="kubernetes")
