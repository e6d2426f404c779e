"""The stop request: SIGUSR1 / SIGTERM (Slurm pre-emption, time-limit warning, scancel) set a flag that the
trainer reads after every step; ranks agree on it in one collective, save that step and exit 0. Installed as the very
first thing a training process does, so a signal during start-up (imports, DeepSpeed set-up) is not fatal either.
"""
from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGUSR1 / SIGTERM (Slurm pre-emption, time limit, scancel): finish the step, save, exit 0."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        self._installed = True

    def release(self) -> None:
        """The run has ended (finished, or stopped and saved): a further SIGUSR1 / SIGTERM has nothing left to
        save, so ignore it. Left to Python, interpreter shutdown puts back the default (fatal) action of every
        signal it handled, and a time-limit warning landing in those last moments would turn a finished run into
        a death by signal, which Slurm and the launchers take for a stop to requeue."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
