"""The training job as submitit runs it: one task per rank, each running the training command as a child.

Why a child process and not training inside the submitit task: submitit's pre-timeout handler runs on global
rank 0 only and ends the process right after requeueing, while a DeepSpeed save is collective (every rank must
join). So the task process only supervises. On submitit's signal (USR2, `signal_delay_s` before the time limit)
rank 0 forwards SIGUSR1 to its training child; the ranks agree on the stop flag, finish the step, save, write
RUN_DIR/status.json {"state": "interrupted"} and exit 0; only then does `checkpoint()` return and submitit
requeue the job. The requeued job runs the same command on the same run directory, which resumes from the
newest complete checkpoint. A SIGTERM from Slurm (pre-emption, `scontrol requeue`, scancel) reaches the
children directly and has the same effect; the job is then requeued by Slurm, or by rank 0 below.

A child that fails ends the whole job with an error naming the rank, exit code and the log's last lines; the
other ranks' children are killed (srun --kill-on-bad-exit on Slurm, a marker file on any cluster), so a dead
rank never leaves the others waiting in a collective.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

LOCAL_REQUEUE_EXIT = 144   # submitit's local controller restarts every task when one exits with this code


def read_status(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/status.json as written by the trainer, or {"state": "none"} while there is none; `stale` says a
    `running` run's heartbeat stopped (dimba/training/status.py has the rule)."""
    from dimba.training.status import read_status as read
    return read(run_dir)


def log_tail(path: Optional[Path], lines: int = 20) -> str:
    if path is None or not Path(path).is_file():
        return "(no log)"
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def error_line(log: str) -> str:
    """The last line of a log that states an error ("error: ...", "ValueError: ..."), or ""."""
    pattern = re.compile(r"\s*(error:|\[rank\d+\]: \w*(Error|Exception)|\w*(Error|Exception)\b)")
    hits = [ln.strip() for ln in log.splitlines() if pattern.match(ln)]
    return hits[-1] if hits else ""


def master_port(job_id: str) -> int:
    """Same rule as slurm/train.sh: a port per job id, so jobs sharing a node do not collide."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def _die_with_parent() -> None:
    """Runs in the child before exec: ignore submitit's USR2 (rank 0's parent forwards USR1 instead) and get
    SIGKILL if the supervising task dies, so no training process outlives its job."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class TrainingJob(Checkpointable):
    """Run `command` (e.g. [python, launch/train.py, --config, C, --run-dir, R, ...]) once per task, with
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set from the job. Returns RUN_DIR/status.json
    of a finished run; raises with the failing rank's log tail otherwise."""

    command: list[str]
    run_dir: str
    stop_grace_s: float = 900.0     # rank 0 waits this long for the save after forwarding the stop signal
    requeue_wait_s: float = 300.0   # after an outside interruption, wait this long to be requeued/killed
    _proc: Optional[subprocess.Popen] = field(default=None, init=False, repr=False, compare=False)
    _exited: Optional[threading.Event] = field(default=None, init=False, repr=False, compare=False)

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        marker_prefix = f"{env.job_id}.r{restart}.failed-rank"     # one file per failed rank of this incarnation
        own_marker = env.paths.folder / f"{marker_prefix}{env.global_rank}"
        if env.global_rank == 0:
            (run_dir / "status.json").unlink(missing_ok=True)   # a status of an earlier incarnation is stale
        child_env = dict(os.environ, RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                         LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.hostnames[0],
                         MASTER_PORT=str(master_port(env.job_id)))
        self._exited = threading.Event()
        self._proc = subprocess.Popen(self.command, env=child_env, preexec_fn=_die_with_parent)
        threading.Thread(target=lambda: (self._proc.wait(), self._exited.set()), daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_sigterm)   # replaces submitit's "ignore SIGTERM"
        def other_failure() -> str:
            failed = [p for p in env.paths.folder.glob(marker_prefix + "*") if p != own_marker]
            return failed[0].read_text().strip() if failed else ""

        while not self._exited.wait(0.5):
            if other_failure() and not self._exited.wait(5.0):   # a rank that fails too gets to report its own error
                self._proc.kill()
                self._exited.wait()
                raise RuntimeError(f"rank {env.global_rank} stopped because {other_failure()}")
        rc = self._proc.returncode
        status = read_status(run_dir)
        if status["state"] == "finished" and rc in (0, -signal.SIGUSR1, -signal.SIGTERM):
            return status   # a stop signal that lands after the last save (as the child exits) undoes nothing
        if rc == 0 and status["state"] == "interrupted":
            return self._requeue_after_outside_stop(env)
        tail = log_tail(env.paths.stderr)
        cause = error_line(tail) or status.get("message")
        # launch/train.py states a refusal on the first rank only: a rank that failed without a cause waits for
        # the rank that has one (exiting first, it would have Slurm end that rank before it could say why)
        deadline = time.monotonic() + (10.0 if not cause else 0.0)
        while time.monotonic() < deadline:
            if other_failure():
                raise RuntimeError(f"rank {env.global_rank} stopped because {other_failure()}")
            time.sleep(0.5)
        message = (f"training failed on rank {env.global_rank} of job {env.job_id} with exit code {rc}: "
                   f"{cause or 'see ' + str(env.paths.stderr)}")
        own_marker.write_text(message + "\n")
        raise RuntimeError(f"{message}\nlast lines of {env.paths.stderr}:\n{tail}")

    def _requeue_after_outside_stop(self, env: submitit.JobEnvironment) -> NoReturn:
        """The children stopped on a signal that did not come through submitit (Slurm's SIGTERM, a manual
        SIGUSR1): the checkpoint is saved, so put the job back in the queue and wait to be ended by it."""
        if env.cluster == "local":
            raise SystemExit(LOCAL_REQUEUE_EXIT)
        if env.global_rank == 0 and env.cluster == "slurm":
            # fails harmlessly when Slurm itself is already requeueing or cancelling the job
            subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, timeout=60)
        time.sleep(self.requeue_wait_s)
        raise RuntimeError(f"training of job {env.job_id} was interrupted and saved, but the job was not requeued "
                           f"within {self.requeue_wait_s:.0f}s; resubmit on run dir {self.run_dir} to resume")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """While training runs, pass SIGTERM on (submitit's local controller signals only this process; under
        Slurm the child got it too) and stay: leaving would kill the child mid-save. Once the child is gone,
        a SIGTERM means Slurm is requeueing or cancelling the job: leave now rather than at KillWait."""
        if not self._exited.is_set():
            self._proc.send_signal(signal.SIGTERM)
            return
        raise SystemExit(128 + signum)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 before the time limit or on pre-emption: have every rank save, then
        hand submitit a fresh copy of this job to requeue (it resumes from the run directory)."""
        if self._proc is not None and not self._exited.is_set():
            self._proc.send_signal(signal.SIGUSR1)
            self._exited.wait(self.stop_grace_s)
        return DelayedSubmission(dataclasses.replace(self))


def eval_options(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs (tools/eval.py's measuring options, e.g. batches=2, steps=16,64) as EvalOptions fields;
    checked here so a typo fails at submission, not in every evaluation job."""
    from dimba.evaluation.errors import EvalError
    from dimba.evaluation.evaluate import EvalOptions

    fields = {f.name: f for f in dataclasses.fields(EvalOptions)}
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"evaluation option {pair!r} is not KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            options[key] = [int(v) for v in value.split(",") if v] if key == "steps" else int(value)
        except ValueError:
            raise ValueError(f"evaluation option {key} takes {'comma-separated integers' if key == 'steps' else 'an integer'}, "
                             f"got {value!r}") from None
    try:
        EvalOptions(**options).validate()
    except EvalError as e:
        raise ValueError(f"evaluation options: {e}") from None
    return options


@dataclass
class EvaluationJob(Checkpointable):
    """Evaluate one checkpoint with dimba.evaluation (what tools/eval.py runs): the report goes to `output`,
    its headline scalars (eval/...) into RUN_DIR/tb at the checkpoint's step. Returns those scalars. Re-run
    from the start if pre-empted (an evaluation is short and keeps no state)."""

    data: str
    run_dir: str = ""
    checkpoint: str = ""
    output: str = ""
    options: dict[str, Any] = field(default_factory=dict)   # EvalOptions fields, see eval_options()
    weights: str = "ema"

    def __call__(self) -> dict[str, Any]:
        import torch

        from dimba.evaluation.evaluate import EvalOptions, evaluate
        from dimba.evaluation.report import scalars, write_json, write_tensorboard
        from dimba.training.export import load_model_dir

        if not self.checkpoint or not self.output:
            raise ValueError("EvaluationJob needs checkpoint and output (the watcher fills them in per checkpoint)")
        if not Path(self.checkpoint).is_dir():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} is gone before its evaluation ran (pruned by "
                                    "training.keep_last?); raise training.keep_last or evaluate sooner")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_model_dir(self.checkpoint, device=device, weights=self.weights)
        log = lambda msg: print(f"[eval] {msg}", flush=True)  # noqa: E731
        log(f"{self.checkpoint}: step {loaded.step} on {device}")
        report = evaluate(loaded, self.data, EvalOptions.for_device(device, **self.options), device=device,
                          model_path=self.checkpoint, log=log, on_section=lambda r: write_json(r, Path(self.output)))
        if self.run_dir:
            write_tensorboard(report, self.run_dir, loaded.step)
        return {"step": loaded.step, **scalars(report)}
