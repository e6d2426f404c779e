"""The stop request: SIGUSR1 / SIGTERM (Slurm pre-emption, time-limit warning, scancel, a launcher passing a signal
on) and SIGINT (Ctrl-C) set a flag that the trainer reads after every step; ranks agree on it in one collective,
save that step and exit. Installed as the very first thing a training process does, so a signal during start-up
(imports, DeepSpeed set-up) is not fatal either. A second Ctrl-C raises KeyboardInterrupt: the run ends at once,
as a failure, without saving.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set by SIGUSR1 / SIGTERM (Slurm pre-emption, time limit, scancel) or SIGINT: finish the step, save, exit."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self._installed = True

    def release(self) -> None:
        """The run has ended (finished, or stopped and saved): a further stop signal has nothing left to save, so
        ignore it. Left to Python, interpreter shutdown puts back the default (fatal) action of every signal it
        handled, and a time-limit warning landing in those last moments would turn a finished run into a death by
        signal, which Slurm and the launchers take for a stop to requeue."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    @property
    def exit_code(self) -> int:
        """Exit code of a run stopped by this flag: 0 for SIGUSR1 / SIGTERM (Slurm's and submitit's contract: an
        interrupted run that saved exits 0 and is requeued), 130 for Ctrl-C (a person: the shell's convention)."""
        return 128 + signal.SIGINT if self.signal_name == "SIGINT" else 0

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt("Ctrl-C twice: stopped without saving")
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name
