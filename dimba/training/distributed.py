"""Process-group set-up that works the same under the deepspeed launcher, torchrun, srun and a bare `python`.

The deepspeed launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under
`srun` (one task per GPU or CPU rank) only SLURM_* is set: we derive the same variables from SLURM_PROCID,
SLURM_NTASKS and SLURM_LOCALID; MASTER_ADDR / MASTER_PORT come from the batch script (slurm/train.sh exports
them from the allocation). A bare `python launch/train.py` is a world of one.

How an error ends every rank (`exit_on_error`): a rank that raises prints its one-line error and leaves with
os._exit. Its sockets close with it, so a peer waiting in a gloo collective gets "connection closed" at once,
raises, and leaves the same way; a launcher (deepspeed, torchrun, srun --kill-on-bad-exit) sees a rank fail and
ends the rest. os._exit also skips interpreter shutdown, where a normal exit could block (multiprocessing joining
loader workers, DeepSpeed's and torch's exit hooks waiting on a dead peer); the loader workers die with it
(PR_SET_PDEATHSIG, dimba/data/loader.py). A peer that is alive but stuck (hung I/O, a deadlock) is covered by
the process group's timeout: no collective waits longer than COLLECTIVE_TIMEOUT_S (DIMBA_COLLECTIVE_TIMEOUT_S
overrides it; it must exceed the longest wait of a healthy run, e.g. rank 0 writing the EMA of a large model
while the others wait at the save's barrier).
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from dimba.console import hush_stdout, launcher_flags

COLLECTIVE_TIMEOUT_S = 900.0


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(script: str, args: list[str], ranks: int | None = None) -> list[str]:
    """`deepspeed [--num_gpus N] script args` on this machine (ranks None: every GPU; on a machine without GPUs
    the launcher runs N CPU ranks with gloo), on a free master port so several launches can coexist."""
    gpus = ["--num_gpus", str(ranks)] if ranks else []
    return [sys.executable, "-m", "deepspeed.launcher.runner", *launcher_flags(), *gpus, "--master_port",
            str(free_port()), script, *args]


def resolve_env(environ: dict | None = None) -> dict:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the launcher, from SLURM_*, or for one process."""
    env = dict(os.environ if environ is None else environ)
    out = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        out["RANK"], out["WORLD_SIZE"] = env["RANK"], env["WORLD_SIZE"]
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out["RANK"], out["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if int(out["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in env:
            raise RuntimeError("running under srun with several tasks but MASTER_ADDR is not set; export it in the "
                               "batch script (slurm/train.sh does: first host of $SLURM_JOB_NODELIST)")
    else:
        out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"] = "0", "1", "0"
    out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    else:
        out["MASTER_PORT"] = str(free_port())
    return out


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU) and pick this rank's device."""
    import deepspeed

    os.environ.update(resolve_env())
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        with hush_stdout():                     # DeepSpeed prints "shm_comm_op built successfully" on CPU ranks
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=collective_timeout_s()))
        if backend == "gloo":
            _unlink_shm_buffer(dist.get_rank())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """End this process's group at a normal exit. Left to interpreter shutdown, gloo's threads can abort it
    ("terminate called without an active exception", exit 250: seen once in a loaded CI run after a clean finish)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce gives each rank a 67 MB file /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank> that it never unlinks: every CPU launch left 134 MB of RAM behind (15 GB after a day of tests).
    Once every rank is past init (the barrier) each has mapped all its peers' files, so the names can go at once;
    the mappings live until the processes exit, and a killed run leaks nothing."""
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise max over ranks (used for stop flags: any rank asking stops every rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t.tolist()


def collective_timeout_s() -> float:
    return float(os.environ.get("DIMBA_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT_S))


def one_line(e: BaseException) -> str:
    """`Type: message` on one line, for logs, status.json and people. An error re-raised from a DataLoader worker
    carries the worker's traceback in its message: its last line is the error."""
    text = str(e).strip()
    if "Original Traceback" in text:
        return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", text.splitlines()[-1])    # dimba.data.errors.X: -> X:
    return f"{type(e).__name__}: {' '.join(text.split()) or '(no message)'}"


def peer_lost(e: BaseException) -> str:
    """Why a collective failed when the cause is another rank (gloo's broken connection: it ended first; gloo's
    timeout: it is stuck), as the start of a one-line error; "" for an error of this rank's own."""
    if not isinstance(e, RuntimeError):
        return ""
    if "Connection closed by peer" in str(e) or "Connection reset by peer" in str(e):
        return "another rank ended first (its error is the cause)"
    if "Timed out waiting" in str(e):
        return (f"another rank did not join a collective within {collective_timeout_s():.0f} s (stuck, or on another "
                "machine that died; DIMBA_COLLECTIVE_TIMEOUT_S sets the limit)")
    return ""


def exit_on_error(e: BaseException, rank: int, code: int = 1, show_traceback: bool = False) -> NoReturn:
    """Print the error's one line (after its traceback when show_traceback: a bug, not a bad input) and end this
    process now, without interpreter shutdown: the module docstring says why that ends every rank in seconds."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    if show_traceback:
        traceback.print_exception(e)
    print(f"error: rank {rank}: {one_line(e)}", file=sys.stderr, flush=True)
    os._exit(code)
