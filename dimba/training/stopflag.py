"""The stop request: SIGUSR1 / SIGTERM (Slurm pre-emption, time-limit warning, scancel) set a flag that the
trainer checks after every micro-batch; ranks agree on it, finish the step, save and exit 0. Installed as the very
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

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
