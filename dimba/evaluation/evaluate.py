"""Offline evaluation of one model: likelihood, generation quality per step count, prompted continuation, speed.

    report = evaluate(loaded, "data/shards", EvalOptions(), judge=load_judge("smollm2", "cuda"), device="cuda")

`loaded` is a `LoadedModel` (`dimba.training.export.load_model_dir`), `judge` a `Judge` (judge.py).
What is measured, in order:
  likelihood      the objective's: Gaussian ELBO or masked NELBO upper bound on NLL per token; AR: exact NLL;
                  beside it the train split's unigram model's exact NLL (the best without context)
  (diagnostics)   the objective's own sections: Gaussian: denoising_by_t, context_by_snr
                  (dimba/objectives/gaussian/denoising.py, context.py)
  reference       text statistics (and gen PPL under the judge) of held-out text of the sample length
  generation      per step count: unconditional samples -> diversity/repetition (textstats.py), gen PPL (judge.py)
  prompted        per step count: held-out prompts continued, BLEU/ROUGE against the truth (prompted.py)
  speed           per step count: latency and tokens/s of one batch (speed.py)
  infill_best_guess  infilling once more with the objective's point estimate (a diffusion model: one pass, each
                  position's argmax; AR: greedy decoding), the decoding position-wise accuracy is read at (infill.py)
The AR twin has no step count: it decodes one token per step, so its rows carry steps = sample length.
Each section runs under a progress bar (progress.py) and is timed into `timings_s`; after each, the report so far
goes to `on_section` ("complete": false until the last), which tools/eval.py writes to disk.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch

from dimba.config.schema import SamplingConfig
from dimba.data.shards import unigram_log_probs
from dimba.config.core import ConfigError
from dimba.evaluation.errors import EvalError
from dimba.evaluation.judge import Judge, generative_perplexity
from dimba.objectives.nll import unigram_nll
from dimba.evaluation.infill import infill, infill_passes
from dimba.evaluation.progress import Progress
from dimba.evaluation.prompted import PROMPT_GAIN_PASSES, continue_prompts
from dimba.evaluation.speed import time_generation
from dimba.evaluation.textgen import Request, generate
from dimba.evaluation.textstats import text_stats
from dimba.evaluation.valdata import as_batches, val_sequences


# How much a CPU measures by default: the demo model's eval (configs/tiny.json, 128 tokens) in about 5 minutes
# on 2 cores (benchmarks/results/demo-cpu.md). The dataclass defaults are a GPU's.
CPU_SIZES = {"batches": 4, "t_samples": 8, "steps": [8, 32], "samples": 8, "prompts": 8, "gen_batch": 8,
             "speed_repeats": 1}


@dataclass
class EvalOptions:
    batches: int = 8                  # val batches for the likelihood and the per-t losses
    batch_size: int = 8
    seq_len: int = 0                  # 0: the model's data.seq_len (also the sample length)
    t_samples: int = 32               # stratified log-SNR draws per sequence for the ELBO's diffusion term
    t_buckets: int = 10
    steps: list[int] = field(default_factory=lambda: [16, 64, 256])
    samples: int = 32                 # unconditional samples per step count
    prompts: int = 16
    prompt_len: int = 0               # 0: half the sequence
    gen_batch: int = 16
    speed_batch: int = 0              # 0: gen_batch
    speed_repeats: int = 3
    examples: int = 3                 # decoded texts kept in the report per step count
    seed: int = 0

    @classmethod
    def for_device(cls, device: torch.device | str, **overrides) -> "EvalOptions":
        """The defaults for `device` (a GPU's, or CPU_SIZES on a CPU), with `overrides` that are not None on top."""
        sizes = dict(CPU_SIZES) if torch.device(device).type == "cpu" else {}
        sizes.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**sizes)

    def validate(self) -> None:
        for name in ("batches", "batch_size", "t_samples", "t_buckets", "samples", "prompts", "gen_batch",
                     "speed_repeats"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.steps or any(s < 1 for s in self.steps):
            raise EvalError(f"--steps must be positive integers, got {self.steps}")
        if self.seq_len < 0 or self.prompt_len < 0 or self.speed_batch < 0 or self.examples < 0:
            raise EvalError("--seq-len, --prompt-len, --speed-batch and --examples must be >= 0")


def evaluate(loaded, shards: str, opts: EvalOptions, judge: Optional[Judge] = None,
             device: torch.device | str = "cpu", sampling: Optional[SamplingConfig] = None, model_path: str = "",
             log: Callable[[str], None] = lambda msg: None, progress: Optional[Progress] = None,
             on_section: Optional[Callable[[dict], None]] = None) -> dict:
    """The full report (a JSON-ready dict; see the module doc for its sections). `progress` shows a bar per
    section; `on_section(report)` is called after each section with the report so far ("complete": False until
    the last), so a caller can write it as it grows and an interrupted evaluation keeps what it finished."""
    opts.validate()
    progress = progress or Progress(enabled=False)
    cfg, model, tok = loaded.cfg, loaded.model, loaded.tokenizer
    objective = loaded.objective
    try:
        sampling = objective.sampling(sampling or cfg.sampling)
        for steps in opts.steps:
            objective.with_steps(sampling, steps)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    seq_len = opts.seq_len or cfg.data.seq_len
    prompt_len = opts.prompt_len or seq_len // 2
    if not 1 <= prompt_len < seq_len:
        raise EvalError(f"--prompt-len must be in [1, {seq_len - 1}] for {seq_len}-token sequences, got {prompt_len}")
    warnings = judge.check(loaded) if judge is not None else []
    for w in warnings:
        log(f"warning: {w}")

    n_lik = opts.batches * opts.batch_size
    seqs = val_sequences(shards, tok, seq_len, max(n_lik, opts.prompts, opts.samples))
    batches = as_batches(seqs[:n_lik], opts.batch_size)
    report: dict = {"complete": False, "model": loaded.describe(model_path), "judge": None, "warnings": warnings,
                    "data": {"shards": str(shards), "split": "val", "seq_len": seq_len,
                             "sequences_available": len(seqs), "likelihood_sequences": min(n_lik, len(seqs))},
                    "settings": {**asdict(opts), "seq_len": seq_len, "prompt_len": prompt_len,
                                 "sampling": asdict(sampling), "device": str(device)},
                    "timings_s": {}}
    if judge is not None:
        report["judge"] = judge.info(tok)

    @contextmanager
    def section(name: str, total: int):
        """Time one section under a progress bar of `total` items; hand the report on when it is done."""
        if not progress.enabled:
            log(f"{name} ...")
        t0 = time.perf_counter()
        with progress.section(name, total) as tick:
            yield tick
        report["timings_s"][name] = time.perf_counter() - t0
        if on_section is not None:
            on_section(report)

    with section("likelihood", len(batches)) as tick:
        prior = unigram_log_probs(shards, cfg.model.vocab_size, cfg.model.pad_id)   # None: no train split
        if prior is not None:     # the yardstick: the best NLL of a model that reads no context
            report["likelihood_unigram"] = unigram_nll(prior, batches, cfg.model.pad_id)
        report["likelihood"] = objective.likelihood(model, _ticking(batches, tick), opts.t_samples, opts.seed,
                                                    device)
    lik = report["likelihood"]
    log(f"likelihood: {lik['nll_nats_per_token']:.4f} nats/token ({lik['kind']})")
    if objective.has_diagnostics:
        with section("diagnostics", 1) as tick:
            report.update(objective.diagnostics(model, batches, prior, opts, device))
            tick(1)
    step_counts = objective.step_counts(opts.steps, seq_len)

    reference = [s.tolist() for s in seqs[:opts.samples]]
    with section("reference", 1) as tick:
        report["reference"] = {"sequences": len(reference), "length": seq_len, **text_stats(reference)}
        if judge is not None:
            report["reference"].update(generative_perplexity(judge, tok, reference, opts.gen_batch) or {})
        tick(1)

    report["generation"], report["prompted"], report["infill"], report["speed"] = [], [], [], []
    n_prompts = min(opts.prompts, len(seqs))
    judged = judge is not None       # the bars count the judge's passes over the texts too
    gain_passes = PROMPT_GAIN_PASSES if judged and n_prompts >= 2 else 0
    for steps in step_counts:
        samp = objective.with_steps(sampling, steps)
        label = {"steps": steps, "sampler": samp.sampler}
        with section(f"generation@{steps}", opts.samples * (1 + judged)) as tick:
            requests = [Request(prefix=[], middle_length=seq_len) for _ in range(opts.samples)]
            results, _ = generate(model, cfg, requests, samp, seed=opts.seed, batch_size=opts.gen_batch,
                                  device=device, on_batch=tick)
            tokens = [r.middle for r in results]
            row = {**label, "samples": len(tokens), "length": seq_len, **text_stats(tokens)}
            if judge is not None:
                row.update(generative_perplexity(judge, tok, tokens, opts.gen_batch) or {})
                tick(len(tokens))
            row["examples"] = [tok.decode(t) for t in tokens[:opts.examples]]
            report["generation"].append(row)
        with section(f"prompted@{steps}", n_prompts * (1 + gain_passes)) as tick:
            report["prompted"].append({**label, **continue_prompts(
                model, cfg, tok, seqs[:opts.prompts], prompt_len, samp, opts.seed + 1, opts.gen_batch, device,
                opts.examples, judge, on_batch=tick)})
        with section(f"infill@{steps}", n_prompts * infill_passes(cfg)) as tick:
            report["infill"].append({**label, **infill(model, cfg, tok, seqs[:opts.prompts], samp, opts.seed + 2,
                                                       opts.gen_batch, device, on_batch=tick)})
        with section(f"speed@{steps}", opts.speed_repeats + 1) as tick:
            report["speed"].append({**label, **time_generation(
                model, cfg, samp, opts.speed_batch or opts.gen_batch, seq_len, opts.speed_repeats, opts.seed,
                device, on_batch=tick)})
        log(f"steps {steps}: entropy {row['unigram_entropy_bits']:.2f} bits, rep {row['repetition_rate']:.3f}"
            + (f", gen PPL {row['gen_ppl']:.1f}" if row.get("gen_ppl") is not None else "")
            + f", BLEU {report['prompted'][-1]['bleu']:.2f}, {report['speed'][-1]['tokens_per_s']:.0f} tok/s")
    best = objective.best_guess(objective.with_steps(sampling, 1))
    with section("infill@best", n_prompts * infill_passes(cfg)) as tick:
        report["infill_best_guess"] = {"steps": objective.step_counts([1], seq_len)[0], "sampler": best.sampler,
                                       "decoding": "greedy", **infill(model, cfg, tok, seqs[:opts.prompts], best,
                                                                      opts.seed + 2, opts.gen_batch, device,
                                                                      on_batch=tick)}
    report["complete"] = True
    if on_section is not None:
        on_section(report)
    return report


def _ticking(items: Iterable, tick: Callable[[int], None]) -> Iterator:
    for item in items:
        yield item
        tick(1)
