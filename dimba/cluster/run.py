"""Submit a run (training + checkpoint watcher) and wait for it: what launch/submit.py calls.

    jobs = submit_run(train_command, run_dir, spec, evaluation)   # returns at once
    outcome = wait_run(jobs)                                       # blocks; raises RunFailed with the cause

RUN_DIR/jobs.json records the job ids and the submitit folder, so a later `wait_run(load_run(run_dir))` from
another shell (or after the submitting shell ended, on Slurm) can follow the same run.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import submitit
from submitit.core.utils import FailedJobError

from dimba.cluster.jobs import EvaluationJob, TrainingJob, read_status
from dimba.cluster.spec import ClusterSpec, make_executor
from dimba.cluster.watch import CheckpointWatcher


class RunFailed(RuntimeError):
    """A job of the run failed or was cancelled; the message carries the job's own error."""


@dataclass
class RunJobs:
    run_dir: Path
    folder: Path
    spec: ClusterSpec
    train: submitit.Job
    watch: Optional[submitit.Job]


def submit_run(train_command: list[str], run_dir: Path, spec: ClusterSpec, evaluation: Optional[EvaluationJob],
               folder: Optional[Path] = None, poll_s: float = 30.0, name: str = "dimba") -> RunJobs:
    """Submit the training job and, with `evaluation`, the watcher that evaluates each new checkpoint."""
    run_dir = Path(run_dir).resolve()
    folder = Path(folder).resolve() if folder else run_dir / "submitit"
    run_dir.mkdir(parents=True, exist_ok=True)
    train = make_executor(spec, folder, "train", name).submit(TrainingJob(list(train_command), str(run_dir)))
    watch = None
    if evaluation is not None:
        watcher = CheckpointWatcher(str(run_dir), train.job_id, spec, str(folder), evaluation, poll_s, name)
        watch = make_executor(spec, folder, "watch", name).submit(watcher)
    record = {"cluster": spec.cluster, "folder": str(folder), "train": train.job_id, "train_tasks": train.num_tasks,
              "watch": watch.job_id if watch else None}
    (run_dir / "jobs.json").write_text(json.dumps(record, indent=1) + "\n")
    return RunJobs(run_dir, folder, spec, train, watch)


def _failure(job: submitit.Job, what: str) -> RunFailed:
    """The most telling error among the job's tasks: a raised exception (with its trace) beats 'no output'."""
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    errors = [t.exception() for t in tasks]
    raised = [e for e in errors if isinstance(e, FailedJobError)]
    error = (raised or [e for e in errors if e is not None] or [None])[0]
    return RunFailed(f"{what} job {job.job_id} failed (state {job.state}):\n{error}")


def _wait(jobs: list[submitit.Job], deadline: Optional[float], poll_s: float) -> None:
    while not all(j.done() for j in jobs):
        if deadline is not None and time.monotonic() > deadline:
            for j in jobs:
                if not j.done():
                    j.cancel(check=False)
            raise TimeoutError(f"jobs {', '.join(j.job_id for j in jobs)} not done in time; cancelled them")
        time.sleep(poll_s)


def wait_run(jobs: RunJobs, timeout_s: Optional[float] = None, poll_s: float = 2.0) -> dict[str, Any]:
    """Wait for training and watcher; returns {"status": RUN_DIR/status.json, "evaluations": {tag: report}}.
    Raises RunFailed naming the failed job and its error (the training error first)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = [jobs.train] + ([jobs.watch] if jobs.watch else [])
    try:
        _wait(waited, deadline, poll_s)
    except KeyboardInterrupt:
        if jobs.spec.cluster == "local":     # local jobs are children of this process: do not orphan them
            for j in waited:
                j.cancel(check=False)
        raise
    if jobs.train.exception() is not None:
        raise _failure(jobs.train, "training")
    evaluations: dict[str, Any] = {}
    if jobs.watch is not None:
        if jobs.watch.exception() is not None:
            raise _failure(jobs.watch, "checkpoint watcher")
        evaluations = jobs.watch.result()
    return {"status": read_status(jobs.run_dir), "evaluations": evaluations}


def load_run(run_dir: Path) -> RunJobs:
    """Re-attach to a run submitted earlier (Slurm: from any shell on the cluster)."""
    run_dir = Path(run_dir).resolve()
    record_file = run_dir / "jobs.json"
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file} not found: {run_dir} was not submitted with launch/submit.py")
    record = json.loads(record_file.read_text())
    if record["cluster"] != "slurm":
        raise ValueError(f"run {run_dir} ran with cluster '{record['cluster']}': only Slurm runs can be re-attached")
    folder = Path(record["folder"])
    spec = ClusterSpec(cluster="slurm")
    train = submitit.SlurmJob(folder=folder, job_id=record["train"], tasks=list(range(record["train_tasks"])))
    watch = submitit.SlurmJob(folder=folder, job_id=record["watch"]) if record["watch"] else None
    return RunJobs(run_dir, folder, spec, train, watch)

