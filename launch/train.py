#!/usr/bin/env python
"""Train a DIMBA model with DeepSpeed.

    python launch/train.py --ranks 8 --config configs/1b.json --run-dir runs/1b    (deepspeed, signals passed on)
    deepspeed --num_gpus 8 launch/train.py --config configs/1b.json --run-dir runs/1b
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.json
    srun python launch/train.py --config configs/1b.json            (see slurm/train.sh)
    python launch/train.py --config configs/tiny.json --set training.max_steps=200

A run directory holds config.json, checkpoints/ and tb/ (tensorboard); starting on an existing one resumes from
its newest complete checkpoint. SIGUSR1/SIGTERM to the ranks: finish the step, save, exit 0 (Slurm requeues);
Ctrl-C: the same, exit 130 (twice: abort without saving). With --ranks N this process runs DeepSpeed's launcher
and passes those signals on to the ranks (DeepSpeed's own launcher does not), then exits 128 + the signal's
number. status.json in the run directory says running (with a heartbeat), finished, interrupted or failed.
"""
import argparse
import os
import sys

from dimba.cli import ArgumentParser, positive_int
from dimba.console import quiet
from dimba.training.run import main


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="JSON config (configs/tiny.json, configs/1b.json, ...)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.lr=3e-4 (repeatable)")
    p.add_argument("--ranks", type=positive_int, default=None, metavar="N",
                   help="start N ranks on this machine with DeepSpeed's launcher and pass stop signals on to them")
    p.add_argument("--verbose", action="store_true", help="also show third-party warnings and launcher logs")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def rank_argv(argv: list[str]) -> list[str]:
    """The command line without --ranks N (what each rank gets)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ranks":
            skip = True
        elif not a.startswith("--ranks="):
            out.append(a)
    return out


if __name__ == "__main__":
    args = parse_args()
    quiet(args.verbose)
    if args.ranks is not None:
        from dimba.training.supervise import main as supervise
        sys.exit(supervise(args.ranks, os.path.abspath(__file__), rank_argv(sys.argv[1:])))
    sys.exit(main(args.config, args.run_dir, args.overrides))
