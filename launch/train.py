#!/usr/bin/env python
"""Train a DIMBA model with DeepSpeed.

    deepspeed --num_gpus 8 launch/train.py --config configs/1b.json --run-dir runs/1b
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.json
    srun python launch/train.py --config configs/1b.json            (see slurm/train.sh)
    python launch/train.py --config configs/tiny.json --set training.max_steps=200

A run directory holds config.json, checkpoints/ and tb/ (tensorboard); starting on an existing one resumes from
its newest complete checkpoint. SIGUSR1/SIGTERM: finish the step, save, exit 0.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dimba.training.run import main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON config (configs/tiny.json, configs/1b.json, ...)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.lr=3e-4 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    sys.exit(main(args.config, args.run_dir, args.overrides))
