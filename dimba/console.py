"""What reaches the console: messages a user cannot act on stay off it unless --verbose.

Every entry point calls `quiet(args.verbose)` before it imports DeepSpeed; the choice travels to the ranks a
launcher starts in the environment (DIMBA_VERBOSE=1). What it keeps off the console, and how:
  DeepSpeed's accelerator guess, "Setting accelerator to CPU. If you have GPU ...", printed at import by every
      process of a machine without CUDA: DS_ACCELERATOR=cpu, the accelerator DeepSpeed would pick anyway;
  the launcher's INFO lines (world info, CUDA_VISIBLE_DEVICES on a CPU machine, spawned commands), its
      hostfile warning and its "[ERROR] ... exits with return code = N" when a rank fails (the rank has said why
      in its own line, and the exit code still comes through): `deepspeed --log_level critical` (`launcher_flags`,
      used by distributed.deepspeed_command for one machine's ranks);
  "DeepSpeed deepspeed_shm_comm_op built successfully", printed by every CPU rank in init_distributed:
      `hush_stdout` around that call;
  torch's FutureWarnings about the deprecated torch.distributed calls DeepSpeed makes (all_gather_into_tensor).
Warnings that our own code causes are fixed where they arise, not filtered here.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Iterator

VERBOSE_ENV = "DIMBA_VERBOSE"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet(verbose: bool = False) -> None:
    """Keep third-party noise off the console for this process and the processes it starts (verbose: show it)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        return
    if "DS_ACCELERATOR" not in os.environ:
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def launcher_flags() -> list[str]:
    """DeepSpeed launcher flags: nothing of its own but a crash, unless verbose."""
    return [] if is_verbose() else ["--log_level", "critical"]


@contextlib.contextmanager
def hush_stdout() -> Iterator[None]:
    """Swallow what third-party code prints to stdout inside the block (unless verbose)."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
