"""RUN_DIR/status.json: what a run is doing, written by the trainer, read by people and tools.

    {"state": "running", "step": 120, "max_steps": 300, "loss": 5.31, "eta_s": 410.0, "last_checkpoint": 100,
     "heartbeat": 1764640000.0, "log_interval_s": 2.3, "message": ""}

state is `running` (rewritten at every log step: the heartbeat), then one of `finished`, `interrupted` (a stop
signal: saved, a restart resumes) or `failed` (message: the error's one line). A run killed outright (SIGKILL, a
lost node) cannot write its end: it stays `running` with a heartbeat that stops moving. `read_status` calls such
a run stale once its heartbeat is older than STALE_INTERVALS log intervals (and at least STALE_MIN_S, since the
first step, a validation or a save can take much longer than a logged step).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

STATUS_FILE = "status.json"
STATES = ("running", "finished", "interrupted", "failed")
STALE_INTERVALS = 10
STALE_MIN_S = 300.0


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """Atomically replace RUN_DIR/status.json (a reader never sees half a file); stamps the heartbeat."""
    if state not in STATES:
        raise ValueError(f"status state must be one of {STATES}, got {state!r}")
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"state": state, **fields, "heartbeat": time.time()}) + "\n")
    os.replace(tmp, path)


def read_status(run_dir: Path, now: Optional[float] = None) -> dict[str, Any]:
    """status.json plus `stale` (True: says running, but its heartbeat stopped: the process is gone);
    {"state": "none", "stale": False} while there is none (or it cannot be parsed)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {"state": "none", "stale": False}
    status["stale"] = False
    if status.get("state") == "running":
        age = (time.time() if now is None else now) - float(status.get("heartbeat", 0.0))
        interval = float(status.get("log_interval_s") or 0.0)
        status["stale"] = age > max(STALE_INTERVALS * interval, STALE_MIN_S)
    return status


def record_failure(run_dir: Path, message: str, since: float) -> None:
    """A process of the run failed: write `failed` with its one-line message (keeping step, loss, ... of this
    incarnation's last heartbeat), unless another rank already recorded a failure since `since` (this process's
    start). The rank where a failure starts records it before it exits; its peers fail after it, on the broken
    connection, and must not overwrite the cause with that echo (run.py lets them wait a moment first)."""
    status = read_status(run_dir)
    this_run = float(status.get("heartbeat", 0.0)) >= since
    if status["state"] == "failed" and this_run:
        return
    keep = {k: v for k, v in status.items() if k not in ("state", "stale", "heartbeat", "message")} if this_run else {}
    write_status(run_dir, "failed", **keep, message=message)
