#!/usr/bin/env python
"""Sample text from a DIMBA model (Gaussian or masked diffusion, or the autoregressive twin).

    python tools/sample.py --model models/tiny --prompt "It was a dark and stormy night" --num-samples 4
    python tools/sample.py --model runs/tiny --num-samples 8 --length 64            # unconditional, from a run dir
    python tools/sample.py --model models/tiny --prefix "Alice was" --suffix "the rabbit." --middle-length 12
    python tools/sample.py --model models/tiny --prompts-file prompts.txt --output samples.jsonl --seed 3

--model takes a converted folder (tools/convert.py), a training run directory or a checkpoint folder. A prompt
is kept exactly (never noised) and the model writes --length tokens after it; --prefix/--suffix fill a gap of
--middle-length tokens between them (diffusion models only: an AR model can only continue the prefix). Same
--seed, same batch size: same text.

Samplers by objective (the model's config says its objective; the first is its default):
  gaussian  ddim, ddpm
  masked    ancestral (MDLM; caching), confidence (LLaDA / MaskGIT); --block-length for semi-autoregressive blocks
  ar        recurrent
"""
import json
import os
import sys

from dimba.cli import ArgumentParser, device, nonnegative_int, positive_int
from dimba.console import quiet


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="converted model folder, run directory or checkpoint folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="text to continue (omit for unconditional samples)")
    src.add_argument("--prompts-file", default=None, help="one prompt per line")
    src.add_argument("--prefix", default=None, help="infilling: text before the gap")
    p.add_argument("--suffix", default=None, help="infilling: text after the gap (with --prefix)")
    p.add_argument("--middle-length", type=positive_int, default=16, help="infilling: tokens to write between prefix and suffix")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples per prompt")
    p.add_argument("--length", type=positive_int, default=64, help="tokens to generate after the prompt")
    p.add_argument("--steps", type=positive_int, default=None, help="diffusion sampling steps (default: the config's sampling.steps)")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "ancestral", "confidence", "recurrent"], default=None,
                   help="the sampler; it must belong to the model's objective (see above; default: the config's)")
    p.add_argument("--block-length", type=nonnegative_int, default=None,
                   help="masked samplers: reveal the text in blocks of this many tokens, left to right (0: one block)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise (0: deterministic)")
    p.add_argument("--spacing", choices=["uniform", "quadratic", "trailing"], default=None,
                   help="Gaussian samplers: how the steps are spread over the noise levels")
    p.add_argument("--temperature", type=float, default=None, help="divide the logits by this before each token pick")
    p.add_argument("--top-k", type=nonnegative_int, default=None, help="pick only among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="pick only among the likeliest tokens whose probability reaches p (1: all)")
    p.add_argument("--x0-temperature", type=float, default=None,
                   help="softmax/posterior x0 heads: sharpen (< 1) the x0 estimate at every step")
    p.add_argument("--greedy", action="store_true", help="argmax at the last step")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale for prompted/infilling samples (1: none, >1: closer to the prompt)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and batch size give the same text")
    p.add_argument("--batch-size", type=positive_int, default=16, help="samples generated together")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="for run/checkpoint folders")
    p.add_argument("--device", type=device, default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--output", default=None, help="also write the samples as JSONL")
    p.add_argument("--verbose", action="store_true", help="also show third-party warnings and DeepSpeed logs")
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet(args.verbose)
    from tqdm import tqdm

    from dimba.config.core import ConfigError, from_dict, to_dict
    from dimba.config.schema import SamplingConfig
    from dimba.evaluation.textgen import Request, generate
    from dimba.training.export import ModelLoadError, load_model_dir

    try:
        loaded = load_model_dir(args.model, args.device, args.weights)
        overrides = {k: v for k, v in {"steps": args.steps, "sampler": args.sampler, "eta": args.eta,
                                        "spacing": args.spacing, "temperature": args.temperature, "top_k": args.top_k,
                                        "top_p": args.top_p, "guidance": args.guidance,
                                        "x0_temperature": args.x0_temperature,
                                        "block_length": args.block_length}.items() if v is not None}
        if args.greedy:
            overrides["greedy"] = True
        objective = loaded.objective
        sampling = objective.sampling(from_dict(SamplingConfig, {**to_dict(loaded.cfg.sampling), **overrides},
                                                "sampling"))
        if args.suffix is not None and args.prefix is None:
            raise ConfigError("--suffix needs --prefix (use --prefix '' for a gap at the start)")
        if args.prompts_file is not None:
            if not os.path.isfile(args.prompts_file):
                raise ConfigError(f"--prompts-file {args.prompts_file} not found")
            with open(args.prompts_file) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        else:
            prompts = [args.prompt or ""]
    except (ModelLoadError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = loaded.tokenizer
    requests = []
    if args.prefix is not None:
        if not objective.uses_suffix and args.suffix:
            print("note: an autoregressive model cannot use --suffix; it continues the prefix only", file=sys.stderr)
        middle = args.middle_length
        suffix = tok.encode(args.suffix or "") if objective.uses_suffix else []
        for _ in range(args.num_samples):
            requests.append(Request(tok.encode(args.prefix), middle, suffix))
    else:
        for prompt in prompts:
            for _ in range(args.num_samples):
                requests.append(Request(tok.encode(prompt), args.length))
    too_long = [r.length for r in requests if objective.parallel and r.length > 4 * loaded.cfg.data.seq_len]
    if too_long:
        print(f"note: frames of {max(too_long)} tokens are far beyond the training length {loaded.cfg.data.seq_len}",
              file=sys.stderr)
    bar = tqdm(total=len(requests), desc="sampling", unit="sample", file=sys.stderr, disable=not sys.stderr.isatty())
    results, stats = generate(loaded.model, loaded.cfg, requests, sampling, args.seed, args.batch_size, args.device,
                              on_batch=bar.update)
    bar.close()
    rows = []
    for i, res in enumerate(results):
        r = res.request
        prefix, middle, suffix = tok.decode(r.prefix), tok.decode(res.middle), tok.decode(r.suffix)
        row = {"index": i, "prefix": prefix, "middle": middle, "suffix": suffix,
               "text": tok.decode(r.prefix + res.middle + r.suffix), "tokens": res.middle}
        rows.append(row)
        if args.prefix is not None:
            print(f"--- sample {i}\n[{prefix}] {middle} [{suffix}]")
        else:
            print(f"--- sample {i}\n" + (f"[{prefix}] " if prefix else "") + middle)
    if args.output:
        with open(args.output, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(f"generated {stats.tokens} tokens in {stats.seconds:.2f}s: {stats.tokens_per_s:.1f} tokens/s "
          f"({objective.name}, {sampling.sampler}, "
          f"{sampling.steps if objective.parallel else stats.tokens // max(len(results), 1)} steps)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
