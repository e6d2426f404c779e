#!/usr/bin/env python
"""Turn a DeepSpeed training checkpoint into one portable model folder.

    python tools/convert.py runs/tiny --output models/tiny                    # newest checkpoint, EMA weights
    python tools/convert.py runs/1b/checkpoints/step-00010000 --output m --weights raw --dtype bf16

Works for every ZeRO stage and any number of ranks. Writes OUTPUT/model.safetensors, config.json (the resolved
training config) and tokenizer.model; tools/sample.py and tools/eval.py take that folder (or the run directory).
"""
import sys

from dimba.cli import ArgumentParser
from dimba.console import quiet
from dimba.training.export import ModelLoadError, convert_checkpoint


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("source", help="training run directory (uses its newest complete checkpoint) or a checkpoint folder")
    p.add_argument("--output", required=True, help="folder to write model.safetensors, config.json, tokenizer.model into")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA weights (default) or the raw trained weights")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="storage dtype of the weights")
    p.add_argument("--verbose", action="store_true", help="also show third-party warnings and DeepSpeed logs")
    args = p.parse_args(argv)
    quiet(args.verbose)
    try:
        out = convert_checkpoint(args.source, args.output, args.weights, args.dtype)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/model.safetensors ({args.weights} weights, {args.dtype}), config.json, tokenizer.model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
