"""The checkpoint watcher: a small job beside training that gets every new checkpoint evaluated.

It polls RUN_DIR/checkpoints for complete checkpoints (folders with a COMPLETE marker, see
dimba/training/checkpoint.py) and submits one `EvaluationJob` per checkpoint; each writes
RUN_DIR/eval/<tag>.json and adds its metrics to the run's tensorboard at the checkpoint's step. The watcher ends
once training is over (status.json says finished/failed or its heartbeat is stale, its job left the queue,
or its result file exists) and every evaluation has come back. It returns {tag: {"step": N, "eval/...": value,
...}} ({"error": ...} for an evaluation that failed) and writes the same to RUN_DIR/eval/summary.json.

A checkpoint that already has its report is not evaluated again, so a requeued watcher picks up where it was.
Checkpoints pruned by training.keep_last before the watcher saw them are not evaluated: poll faster than
checkpoints are written, or raise keep_last.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths
from submitit.helpers import Checkpointable, DelayedSubmission

from dimba.cluster.jobs import EvaluationJob, read_status
from dimba.cluster.spec import ClusterSpec, make_executor
from dimba.evaluation.report import scalars
from dimba.training.checkpoint import complete_checkpoints

ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                       "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED", "PREEMPTED"}


def slurm_job_active(job_id: str) -> bool:
    """True while Slurm still has the job (queued, running, being requeued); False once it ended or is gone.
    An unreachable controller counts as active: the next poll decides."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return "Invalid job id" not in out.stderr
    states = set(out.stdout.split())
    return bool(states & ACTIVE_SLURM_STATES)


def pid_alive(pid: int) -> bool:
    """A local job's id is its controller's pid; a zombie (finished, not yet reaped) counts as ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def training_over(run_dir: Path, cluster: str, folder: Path, job_id: str) -> bool:
    status = read_status(run_dir)
    if status["state"] in ("finished", "failed") or status["stale"]:   # stale: it died without a word
        return True
    if JobPaths(folder, job_id=job_id, task_id=0).result_pickle.exists():
        return True
    if cluster == "slurm":
        return not slurm_job_active(job_id)
    return not pid_alive(int(job_id))


def _outcome(job: submitit.Job) -> dict[str, Any]:
    try:
        return job.result()
    except Exception as e:  # the job's own error, or submitit's "no output" for a job killed from outside
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                "job_id": job.job_id, "log": str(job.paths.stderr)}


@dataclass
class CheckpointWatcher(Checkpointable):
    run_dir: str
    training_job_id: str
    spec: ClusterSpec
    folder: str                    # submitit folder of the run (training's result file, eval job logs)
    evaluation: EvaluationJob      # template: its checkpoint/output are filled in per checkpoint
    poll_s: float = 30.0
    name: str = "dimba"

    def __call__(self) -> dict[str, dict[str, Any]]:
        run_dir, folder = Path(self.run_dir), Path(self.folder)
        eval_dir = run_dir / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        executor = make_executor(self.spec, folder, "eval", self.name)
        pending: dict[str, submitit.Job] = {}
        reports: dict[str, dict[str, Any]] = {}
        while True:
            over = training_over(run_dir, self.spec.cluster, folder, self.training_job_id)
            for ckpt in complete_checkpoints(run_dir / "checkpoints"):
                tag, report = ckpt.name, eval_dir / f"{ckpt.name}.json"
                if tag in pending or tag in reports:
                    continue
                if report.is_file():   # evaluated by an earlier incarnation of this watcher
                    full = json.loads(report.read_text())
                    reports[tag] = {"step": full["model"]["step"], **scalars(full)}
                    continue
                job = replace(self.evaluation, checkpoint=str(ckpt), output=str(report))
                with submitit.helpers.clean_env():   # not this job's SLURM_*/SUBMITIT_* for the new one
                    pending[tag] = executor.submit(job)
                print(f"[watch] {tag}: evaluation job {pending[tag].job_id}", flush=True)
            for tag, job in list(pending.items()):
                if job.done():
                    reports[tag] = _outcome(job)
                    del pending[tag]
                    print(f"[watch] {tag}: {'failed: ' + reports[tag]['error'] if 'error' in reports[tag] else 'done'}",
                          flush=True)
            if over and not pending:
                break
            time.sleep(self.poll_s)
        (eval_dir / "summary.json").write_text(json.dumps(reports, indent=1, sort_keys=True) + "\n")
        failed = {tag: r for tag, r in reports.items() if "error" in r}
        if failed:
            lines = "; ".join(f"{tag}: {r['error']} (log {r.get('log')})" for tag, r in sorted(failed.items()))
            raise RuntimeError(f"{len(failed)} of {len(reports)} checkpoint evaluations failed: {lines}")
        return reports

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # reports on disk are the state: a requeued watcher skips evaluated checkpoints
        return DelayedSubmission(replace(self))
