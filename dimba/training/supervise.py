"""`python launch/train.py --ranks N ...`: DeepSpeed's launcher for N ranks on this machine, with signals passed on.

DeepSpeed's single-node launcher is two processes, `deepspeed.launcher.runner` and `deepspeed.launcher.launch`
(read from their source, DeepSpeed 0.19): the runner installs no signal handler, so SIGTERM/SIGUSR1 end it at once
and the ranks train on, orphaned; `launch` answers SIGINT/SIGTERM by sending SIGTERM to every rank and loader
worker and SIGKILL 30 s later, whether or not the save is done, and exits 1. Neither passes SIGUSR1 on.

This supervisor starts that launcher in a session of its own (so a terminal's Ctrl-C reaches the supervisor
alone) and passes SIGINT/SIGTERM/SIGUSR1 to the ranks only, which finish the step, save and exit (the trainer's
stop flag); a second Ctrl-C is passed on too and aborts them. It waits for the launcher, removes whatever is
left in its session, and exits with 128 + the signal's number when it was signalled (130 Ctrl-C, 143 SIGTERM,
138 SIGUSR1: "interrupted", never 0), else with the launcher's code. A rank that fails ends the others through
the launcher (and the broken connection, see distributed.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def rank_pids(launcher_pid: int) -> list[int]:
    """The ranks: children of `deepspeed.launcher.launch`, itself the child of the runner `launcher_pid`."""
    import psutil
    try:
        return [r.pid for launch in psutil.Process(launcher_pid).children() for r in launch.children()]
    except psutil.Error:
        return []


def supervise(cmd: list[str], poll_s: float = 0.2) -> int:
    """Run `cmd` (a deepspeed launcher command) to its end, passing stop signals to its ranks; the exit code."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []
    killed = []

    def forward(signum, frame) -> None:
        received.append(signum)
        pids = rank_pids(proc.pid)
        if not pids:                  # no rank started yet: nothing to save, end the launch
            killed.append(True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(ProcessLookupError):   # anything left in the launch's session (no rank still
            os.killpg(proc.pid, signal.SIGKILL)          # saving: the launcher outlives its ranks)
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    if received and (code in (0, 128 + signal.SIGINT) or killed):   # stopped (and saved) as asked
        return 128 + received[0]
    return code                                                     # finished, or failed (also while stopping)


def main(ranks: int, script: str, args: list[str]) -> int:
    from dimba.training.distributed import deepspeed_command
    return supervise(deepspeed_command(script, args, ranks))
