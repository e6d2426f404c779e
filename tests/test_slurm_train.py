"""slurm/train.sh on a real local Slurm: two CPU ranks via srun, checkpoints, pre-emption + requeue, failures."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.slurm_fixture import EVAL_TINY, REPO, TERMINAL, TINY, SlurmCluster, read_json, read_scalars

pytestmark = pytest.mark.slurm

CPU_2_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def submit_train(cluster: SlurmCluster, run_dir: Path, overrides: list[str], *sbatch_args: str) -> str:
    out = run_dir.parent / f"{run_dir.name}.out"
    return cluster.sbatch(*CPU_2_TASKS, *sbatch_args, f"--output={out}", "slurm/train.sh", "configs/tiny.json",
                          *overrides, env={"RUN_DIR": str(run_dir)})


def job_log(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text()


def tokens_per_step(overrides: list[str], world: int = 2) -> int:
    kv = dict(o.split("=", 1) for o in overrides)
    return int(kv["deepspeed.train_micro_batch_size_per_gpu"]) * int(kv["data.seq_len"]) * world


MAX_STEPS = 40


def run_overrides(shards: Path) -> list[str]:
    return [*TINY, f"data.shards={shards}", f"training.max_steps={MAX_STEPS}", "training.checkpoint_every=10",
            "training.keep_last=10", "data.seq_len=64", "deepspeed.train_micro_batch_size_per_gpu=8"]


def loss_lines(log: str) -> dict[int, str]:
    """step -> 'loss .. mse .. ce .. acc .. lr ..' (throughput fields dropped: they differ run to run)."""
    return {int(m[1]): m[2] for m in re.finditer(r"\[dimba\] step (\d+) (loss .*?) tok/s", log)}


@pytest.fixture(scope="module")
def reference_run(slurm_cluster: SlurmCluster, slurm_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted 2-rank run: the test of train.sh itself and the yardstick for the resumed runs."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job = submit_train(slurm_cluster, run_dir, run_overrides(slurm_shards))
    state = slurm_cluster.wait(job, timeout=150)
    return job, state, run_dir


def test_train_two_tasks_checkpoints_and_exits_0(slurm_cluster: SlurmCluster, reference_run) -> None:
    job, state, run_dir = reference_run
    log = job_log(run_dir)
    assert state == "COMPLETED", log
    assert slurm_cluster.job(job)["ExitCode"] == "0:0"
    status = read_json(run_dir / "status.json")
    assert status["state"] == "finished" and status["step"] == MAX_STEPS
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert ckpts == [f"step-{s:08d}" for s in range(10, MAX_STEPS + 1, 10)]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{MAX_STEPS:08d}"
    assert "world size 2" in log and f"master {slurm_cluster.job(job)['NodeList']}:" in log
    assert sorted(loss_lines(log)) == list(range(5, MAX_STEPS + 1, 5))
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert slurm_cluster.sacct_states(job) == {job: "COMPLETED", f"{job}.batch": "COMPLETED", f"{job}.0": "COMPLETED"}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["scontrol-requeue", "usr1"])
def test_preempted_job_resumes_without_lost_steps(how: str, slurm_cluster: SlurmCluster, slurm_shards: Path,
                                                  reference_run, tmp_path: Path) -> None:
    """`scontrol requeue` (what a pre-empting scheduler does: SIGTERM to every process of the job, then
    requeue) and SIGUSR1 (what --signal sends before the time limit; the script requeues itself) both end in
    one finished run that matches the uninterrupted reference run step for step."""
    run_dir = tmp_path / "run"
    overrides = run_overrides(slurm_shards)
    job = submit_train(slurm_cluster, run_dir, overrides)
    first = run_dir / "checkpoints" / "step-00000010" / "COMPLETE"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert time.monotonic() < deadline, f"no first checkpoint after 120 s:\n{job_log(run_dir)}"
        assert slurm_cluster.state(job) in ("PENDING", "RUNNING"), job_log(run_dir)
        time.sleep(0.2)
    if how == "scontrol-requeue":
        slurm_cluster.run_cmd(["scontrol", "requeue", job])
    else:
        slurm_cluster.run_cmd(["scancel", "--signal=USR1", job])

    state = slurm_cluster.wait(job, timeout=240)
    log = job_log(run_dir)
    assert state == "COMPLETED", log
    assert int(slurm_cluster.job(job)["Restarts"]) == 1, log
    status = read_json(run_dir / "status.json")
    assert status["state"] == "finished" and status["step"] == MAX_STEPS, log

    # The first incarnation stopped between checkpoints and saved where it stopped; the second resumed there.
    stopped = re.findall(r"stopping at step (\d+) on (\w+)", log)
    assert len(stopped) == 1, log
    stop_step = int(stopped[0][0])
    assert 10 <= stop_step < MAX_STEPS, log
    assert stopped[0][1] == ("SIGTERM" if how == "scontrol-requeue" else "SIGUSR1"), log
    resumed = re.findall(r"resumed from \S+step-(\d+) at step (\d+)", log)
    assert resumed == [(f"{stop_step:08d}", str(stop_step))], log
    if how == "usr1":
        assert "requeueing job" in log
    # No step lost or done twice: exactly MAX_STEPS steps' worth of tokens, and every logged loss after the
    # resume equals the uninterrupted run's (same data position, same noise, same optimizer state).
    final = read_json(run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / "state.json")
    assert final["step"] == MAX_STEPS
    assert final["tokens_seen"] == MAX_STEPS * tokens_per_step(overrides), log
    reference = loss_lines(job_log(reference_run[2]))
    resumed_losses = {s: line for s, line in loss_lines(log).items() if s > stop_step}
    assert resumed_losses and resumed_losses == {s: reference[s] for s in resumed_losses}, log


@pytest.mark.slow
def test_time_limit_signal_saves_and_requeues(slurm_cluster: SlurmCluster, slurm_shards: Path,
                                              tmp_path: Path) -> None:
    """The real time-limit path: --time=1 with --signal=USR1@50. Slurm checks limits every 30 s, so the signal
    reaches every process of the step 10-40 s into each incarnation, on a fast machine or a slow one. The run is far
    longer than that, so every incarnation is cut: it saves the step it stopped at, requeues itself, and the next
    one resumes exactly there. After two such cycles the test cancels the job (a requeued run finishing with
    exactly max_steps steps is test_preempted_job_resumes_without_lost_steps)."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.shards={slurm_shards}", "training.max_steps=1000000",
                 "training.checkpoint_every=100000", "training.keep_last=3", "data.seq_len=64",
                 "deepspeed.train_micro_batch_size_per_gpu=8"]
    job = submit_train(slurm_cluster, run_dir, overrides, "--time=1", "--signal=USR1@50")
    deadline = time.monotonic() + 480   # each incarnation lasts at most the 60 s limit, plus the requeue
    out = run_dir.parent / f"{run_dir.name}.out"
    while len(re.findall(r"resumed from", out.read_text() if out.exists() else "")) < 2:
        if time.monotonic() > deadline:
            slurm_cluster.run_cmd(["scancel", job])
            pytest.fail(f"fewer than two resumes after 480 s:\n{job_log(run_dir)}")
        assert slurm_cluster.state(job) not in TERMINAL, job_log(run_dir)   # running, completing, requeued, pending
        time.sleep(0.5)
    slurm_cluster.run_cmd(["scancel", job])
    slurm_cluster.wait(job, timeout=60)
    log = job_log(run_dir)
    # One entry per incarnation: where it resumed (0: a fresh start) and where the time-limit warning stopped it.
    incarnations = re.split(r"\[train\.sh\] job \d+ restart \d+:", log)[1:]
    assert len(incarnations) >= 3, log
    done = 0
    for text in incarnations[:2]:
        resumed = re.findall(r"resumed from \S+step-(\d+) at step (\d+)", text)
        assert resumed == ([] if done == 0 else [(f"{done:08d}", str(done))]), log
        stopped = [int(s) for s in re.findall(r"stopping at step (\d+) on SIGUSR1", text)]
        assert len(stopped) == 1 and stopped[0] > done, log     # cut, and made progress before the cut
        assert f"requeueing job {job}" in text, log
        done = stopped[0]
        state = read_json(run_dir / "checkpoints" / f"step-{done:08d}" / "state.json")
        assert state["step"] == done and state["tokens_seen"] == done * tokens_per_step(overrides), log
    assert re.search(rf"resumed from \S+step-{done:08d} at step {done}\b", incarnations[2]), log
    assert int(slurm_cluster.job(job)["Restarts"]) >= 2


def test_failing_training_is_a_clear_failed_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-shards"
    job = submit_train(slurm_cluster, run_dir, [*TINY, f"data.shards={missing}", "training.max_steps=5"])
    assert slurm_cluster.wait(job, timeout=90) == "FAILED"
    log = job_log(run_dir)
    assert f"data.shards: {missing} has no manifest.json" in log
    assert "slurm/train.sh: training failed (exit code 2" in log
    assert slurm_cluster.job(job)["ExitCode"] == "1:0"
    assert int(slurm_cluster.job(job)["Restarts"]) == 0


def test_bad_arguments_fail_before_training(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = submit_train(slurm_cluster, run_dir, ["training.max_steps"])   # not KEY=VALUE
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    assert "override 'training.max_steps' is not KEY=VALUE" in job_log(run_dir)
    out = tmp_path / "noconfig.out"
    job = slurm_cluster.sbatch(*CPU_2_TASKS, f"--output={out}", "slurm/train.sh", "configs/does-not-exist.json")
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    assert "config configs/does-not-exist.json not found" in out.read_text()
    assert not (REPO / "runs").exists() or not any((REPO / "runs").glob(f"*-{job}"))


def test_eval_sh_evaluates_one_checkpoint(slurm_cluster: SlurmCluster, reference_run, tmp_path: Path) -> None:
    """slurm/eval.sh on a checkpoint of the reference run: report JSON in RUN_DIR/eval, metrics in its tb."""
    _, state, run_dir = reference_run
    assert state == "COMPLETED"
    before = set(read_scalars(run_dir / "tb"))
    out = tmp_path / "eval.out"
    ckpt = run_dir / "checkpoints" / "step-00000020"
    tiny = [f"--{kv.split('=')[0].replace('_', '-')}={kv.split('=')[1]}" for kv in EVAL_TINY]
    job = slurm_cluster.sbatch("--gpus-per-node=0", "--cpus-per-task=1", "--time=10", f"--output={out}",
                               "slurm/eval.sh", str(ckpt), *tiny)
    assert slurm_cluster.wait(job, timeout=150) == "COMPLETED", out.read_text()
    report = read_json(run_dir / "eval" / "step-00000020.json")
    assert report and "error" not in report
    added = {tag: steps for tag, steps in read_scalars(run_dir / "tb").items() if tag not in before}
    assert added and all(20 in steps for steps in added.values()), added

    bad = slurm_cluster.sbatch("--gpus-per-node=0", "--time=5", f"--output={tmp_path / 'bad.out'}",
                               "slurm/eval.sh", str(run_dir / "checkpoints" / "step-00000099"))
    assert slurm_cluster.wait(bad, timeout=60) == "FAILED"
    assert "step-00000099 not found" in (tmp_path / "bad.out").read_text()
