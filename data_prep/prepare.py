"""Your own text in one command: train a tokenizer on it (unless --tokenizer) and shard it with a val split.

    python data_prep/prepare.py --input 'my/*.txt' --output data/my
    python launch/train.py --config configs/tiny.json --set data.shards=data/my --set model.vocab_size=4096

Writes OUT/tokenizer/ (tokenizer.model, tokenizer.json) and the shards in OUT as data_prep/shard.py
does. Re-running the same command reuses the tokenizer and resumes the shards. See dimba/data/prepare.py.
"""
from __future__ import annotations

import shlex
import sys

from dimba.cli import ArgumentParser
from dimba.data.errors import DataError
from dimba.data.prepare import PrepareJob, prepare_corpus
from dimba.data.sharding import add_shard_arguments


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files or globs (.gz accepted)")
    p.add_argument("--output", required=True, help="folder for the tokenizer and the shards")
    p.add_argument("--tokenizer", default=None,
                   help="use this tokenizer.model instead of training one on the inputs")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="pieces of the trained tokenizer (default 4096; smaller for a small corpus)")
    p.add_argument("--sample-chars", type=int, default=100_000_000,
                   help="train the tokenizer on a hash-chosen sample of about this many characters (default 1e8)")
    add_shard_arguments(p, val_fraction=0.05)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer and shards of other inputs or settings in --output")
    args = p.parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    job = PrepareJob(inputs=args.input, output=args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                     val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, sample_chars=args.sample_chars,
                     workers=args.workers, fmt=args.format, text_mode=args.text_mode, text_key=args.text_key,
                     progress=not args.no_progress, overwrite=args.overwrite, command=command)
    try:
        manifest = prepare_corpus(job)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to continue", file=sys.stderr)
        return 130
    print(f"ready: python launch/train.py --config configs/tiny.json --set data.shards={args.output} "
          f"--set model.vocab_size={manifest['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
