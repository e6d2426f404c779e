"""Tokenize text into WebDataset token shards (parallel, deterministic, resumable).

    python data_prep/shard.py --input 'data_prep/corpus/*.txt' \
        --tokenizer data_prep/tokenizer/tokenizer.model --output data/shards --val-fraction 0.05

Writes OUT/train-000000.tar ..., OUT/val-000000.tar ..., OUT/manifest.json and a copy of the
tokenizer. Re-running the same command after an interruption keeps the finished shards.
See dimba/data/sharding.py for how, and dimba/data/shards.py for the format.
"""
from __future__ import annotations

import shlex
import sys

from dimba.cli import ArgumentParser
from dimba.data.errors import DataError
from dimba.data.sharding import ShardJob, add_shard_arguments, run_shard_job


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files or globs (.gz accepted)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model from data_prep/train_tokenizer.py")
    p.add_argument("--output", required=True, help="shard directory")
    add_shard_arguments(p, val_fraction=0.01)
    p.add_argument("--overwrite", action="store_true", help="delete shards of another job in --output first")
    args = p.parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    job = ShardJob(inputs=args.input, tokenizer=args.tokenizer, output=args.output, val_fraction=args.val_fraction,
                   shard_tokens=args.shard_tokens, workers=args.workers, fmt=args.format, text_mode=args.text_mode,
                   text_key=args.text_key, progress=not args.no_progress, overwrite=args.overwrite, command=command)
    try:
        run_shard_job(job)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
