"""Train DIMBA's sentencepiece tokenizer (fixed special ids, byte fallback) on a sample of text.

    python data_prep/train_tokenizer.py --input data_prep/corpus/*.txt --vocab-size 4096 --output data_prep/tokenizer

Writes DIR/tokenizer.model and DIR/tokenizer.json. The special ids live in dimba/data/tokenizer.py.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dimba.data.documents import expand_inputs  # noqa: E402
from dimba.data.errors import DataError  # noqa: E402
from dimba.data.tokenizer import train_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files or globs (.gz accepted)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="directory for tokenizer.model and tokenizer.json")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--sample-chars", type=int, default=100_000_000,
                   help="train on a hash-chosen sample of about this many characters (default 1e8)")
    p.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto",
                   help="auto: .jsonl/.ndjson/.json(.gz) are JSONL, the rest text")
    p.add_argument("--text-mode", choices=["blocks", "lines"], default="blocks",
                   help="text files: one document per blank-line-separated block, or per line")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--threads", type=int, default=None, help="training threads (default: all cores)")
    args = p.parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    start = time.time()
    try:
        info = train_tokenizer(expand_inputs(args.input), args.vocab_size, args.output, args.model_type,
                               args.sample_chars, args.format, args.text_mode, args.text_key,
                               args.character_coverage, args.threads, command)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained a {info['vocab_size']}-piece {info['model_type']} tokenizer on {info['trained_on']['documents']} "
          f"documents (sampled fraction {info['trained_on']['sampled_fraction']}) in {time.time() - start:.1f}s: "
          f"{Path(args.output) / info['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
