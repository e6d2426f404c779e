"""Train DIMBA's sentencepiece tokenizer (fixed special ids, <mask>, byte fallback, exact text) on a sample of text.

    python data_prep/train_tokenizer.py --input 'data_prep/corpus/*.txt' --vocab-size 4096 --output data_prep/tokenizer

Writes DIR/tokenizer.model and DIR/tokenizer.json. The special ids live in dimba/data/tokenizer.py.
A tokenizer trained before <mask> existed gets one appended, without retraining (old ids unchanged):

    python data_prep/train_tokenizer.py --add-mask OLD/tokenizer.model --output NEW_DIR
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from dimba.cli import ArgumentParser
from dimba.data.documents import expand_inputs
from dimba.data.errors import DataError
from dimba.data.tokenizer import add_mask_piece, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", help="text or JSONL files or globs (.gz accepted)")
    p.add_argument("--vocab-size", type=int, help="number of pieces, special ids and 256 byte pieces included")
    p.add_argument("--output", required=True, help="directory for tokenizer.model and tokenizer.json")
    p.add_argument("--add-mask", metavar="SRC", default=None,
                   help="instead of training: copy tokenizer SRC into --output with a <mask> piece appended")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece model (default bpe)")
    p.add_argument("--sample-chars", type=int, default=100_000_000,
                   help="train on a hash-chosen sample of about this many characters (default 1e8)")
    p.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto",
                   help="auto: .jsonl/.ndjson/.json(.gz) are JSONL, the rest text")
    p.add_argument("--text-mode", choices=["blocks", "lines"], default="blocks",
                   help="text files: one document per blank-line-separated block, or per line")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters that get pieces of their own; the rarest are spelled in bytes "
                        "(default 0.9995)")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: all cores)")
    args = p.parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    if args.add_mask is None and (args.input is None or args.vocab_size is None):
        p.error("--input and --vocab-size are required (or --add-mask SRC to add <mask> to an existing tokenizer)")
    start = time.time()
    try:
        if args.add_mask is not None:
            info = add_mask_piece(args.add_mask, args.output, command)
            print(f"added {info['special_pieces']['mask']} at id {info['mask_id']} to {args.add_mask}: "
                  f"{Path(args.output) / info['model']} ({info['vocab_size']} pieces)")
            return 0
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
