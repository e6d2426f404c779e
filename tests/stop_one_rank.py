"""launch/train.py, but rank 0 sends itself SIGUSR1 just after it logs step $DIMBA_TEST_STOP_AT: a stop request that
reaches one rank only, in the gap between the ranks' agreement on the stop flag and their save/stop decision
(where a signal from Slurm lands on one rank a moment before the others). Used by tests/test_training.py."""
import os
import runpy
import signal
import sys
from pathlib import Path

from dimba.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STOP_AT = f"step {os.environ['DIMBA_TEST_STOP_AT']} loss"
_log = Trainer.log


def log(self: Trainer, msg: str) -> None:
    _log(self, msg)
    if self.info.rank == 0 and msg.startswith(STOP_AT):
        os.kill(os.getpid(), signal.SIGUSR1)   # the handler runs before the next line of the trainer


Trainer.log = log
sys.argv = [str(ROOT / "launch" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
