#!/usr/bin/env python
"""Gaussian DIMBA and masked DIMBA against their autoregressive twin: equal parameters (the twin's depth matched to
the masked model; the Gaussian one, with its embedding-space projections, is about 6% larger), equal tokens,
the same shards and the same engine; quality and speed.

    python benchmarks/compare_ar.py                         # CPU scale: three models of configs/tiny.json
    python benchmarks/compare_ar.py --models masked,ar      # only some of them (ar always)
    python benchmarks/compare_ar.py --scale gpu --judge none --set training.max_steps=N   # one GPU, through
                                                            #   benchmarks/gpu/run.sh compare S, which fits N to
                                                            #   S seconds of training
    python benchmarks/compare_ar.py --stage report          # redraw the table and the PNG from report.json

Stages, in order (each skipped when its result exists, so re-running continues; training resumes):
  data            data_prep/shard.py on --corpus (default ../shared/data/gutenberg, at the GPU scale with
                  ../shared/data/more too; else the bundled corpus), with the committed 4096-piece tokenizer,
                  into OUT/shards (2% of the documents held out as val)
  train-gaussian  deepspeed launch/train.py: the scale's config with objective gaussian (diffusion.cond_dropout)
  train-masked    the same with objective masked (masked.cond_dropout for guidance)
  train-ar        the same for the AR twin: dimba.objectives.ar_twin picks the depth that equalises the parameter
                  count; same steps, micro-batch, ranks and seq_len, hence the same tokens, same shards
  eval            every model (EMA weights), on held-out windows of the val split:
                    likelihood  each objective's own: Gaussian ELBO bound (with its terms and the diffusion term
                                by band of log-SNR), masked NELBO bound, AR exact NLL, at every kept checkpoint
                                (last and best); and the exact NLL of the train split's unigram model
                    context     Gaussian: what its context earns the denoiser at each noise level, against the
                                exact context-free posterior (dimba.objectives.gaussian.context)
                    generation  unconditional samples, each diffusion model at each T (masked: both samplers), AR
                                decode of the same length: unigram entropy, seq-rep-4 and gen-PPL under the judge
                                (default SmolLM2-135M-Instruct Q4_1, trained on ~2T tokens of other text)
                    infill      middle half hidden: diffusion models with prefix+suffix and with the prefix only,
                                AR with the prefix only
                    guidance    prompted samples at guidance s (classifier-free), AR continuations beside; the
                                prompt gain (dimba.evaluation.prompted.prompt_gain)
                    speed       latency / tokens/s of generating --speed-length tokens at batch 1 and 64
                    sampling    eval-time levers (no retraining)
                  -> OUT/report.json (written after every section)
  report          OUT/report.md (tables + goals) and OUT/compare.png (gen-PPL against latency and guidance; needs a judge)

Equal tokens: every run trains max_steps x micro-batch x ranks x seq_len tokens. The diffusion losses skip clean
(prompt) positions, so they are graded on slightly fewer tokens than they read; all read the same ones.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from dimba.config import load_config
from dimba.data.shards import unigram_log_probs
from dimba.data.tokenizer import MASK_ID
from dimba.evaluation.infill import infill
from dimba.evaluation.judge import SMOLLM2, generative_perplexity, load_judge
from dimba.objectives.nll import unigram_nll
from dimba.evaluation.prompted import bleu, prompt_gain
from dimba.evaluation.speed import ar_speedup, speed_rows
from dimba.evaluation.textgen import Request, generate
from dimba.evaluation.textstats import text_stats
from dimba.evaluation.valdata import as_batches, val_sequences
from dimba.model.build import count_parameters
from dimba.objectives import ar_twin
from dimba.training.distributed import deepspeed_command
from dimba.training.export import load_model_dir, resolve_checkpoint

TOKENIZER = ROOT / "data_prep" / "tokenizer" / "tokenizer.model"
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "gutenberg" / "*.txt"
SHARED_MORE = ROOT.parent / "shared" / "data" / "more" / "*.txt.gz"     # 31 MB more prose (gzip)
BUNDLED_CORPUS = ROOT / "data_prep" / "corpus" / "*.txt"
MODELS = ("gaussian", "masked", "ar")     # the objectives compared; each model's run directory is OUT/NAME
DIFFUSION = ("gaussian", "masked")
# eval-time levers (no retraining), unconditional samples at the guidance section's T; temperature and top_p rows
# are repeated for every model (same options, same meaning: its token pick).
TOKEN_LEVERS = [("top_p 1.0", {"top_p": 1.0}), ("temperature 0.8", {"temperature": 0.8}),
                ("temperature 0.9", {"temperature": 0.9})]
LEVERS = {"gaussian": [("config (ddim, uniform, top_p 0.95)", {}), ("spacing quadratic", {"spacing": "quadratic"}),
                       ("spacing trailing", {"spacing": "trailing"}), ("sampler ddpm", {"sampler": "ddpm"}),
                       *TOKEN_LEVERS],
          "masked": [("config (ancestral, top_p 0.95)", {}), ("sampler confidence", {"sampler": "confidence"}),
                     ("confidence, blocks of 32", {"sampler": "confidence", "block_length": 32}), *TOKEN_LEVERS],
          "ar": [("config (top_p 0.95)", {}), *TOKEN_LEVERS]}
X0_LEVERS = [("x0 temperature 0.7", {"x0_temperature": 0.7}), ("x0 temperature 0.5", {"x0_temperature": 0.5}),
             ("x0 temperature 0.3", {"x0_temperature": 0.3})]          # softmax/posterior heads only


@dataclass
class Scale:
    config: str
    train: list[str]                       # overrides for every model
    ranks: int | None                      # deepspeed --num_gpus (None: every GPU)
    gaussian: list[str] = field(default_factory=lambda: ["diffusion.cond_dropout=0.1"])   # Gaussian DIMBA only
    masked: list[str] = field(default_factory=lambda: ["masked.cond_dropout=0.1"])        # masked DIMBA only
    steps: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    samples: int = 32                      # unconditional samples per row (and held-out reference windows)
    prompts: int = 32                      # prompts (prompted and guidance rows)
    infill_windows: int = 64               # held-out windows with the middle half hidden
    lik_seqs: int = 64                     # val windows for the likelihood
    t_samples: int = 16                    # ELBO draws per sequence
    gen_batch: int = 32
    infill_steps: list[int] = field(default_factory=lambda: [1, 32, 128])   # T = 1: each position's argmax
    guidance: list[float] = field(default_factory=lambda: [0.0, 1.0, 1.5, 2.0, 3.0])
    guidance_steps: int = 32
    prompt_blocks: list[int] = field(default_factory=lambda: [16])   # masked prompted rows again at each s >= 1,
                                           # revealed in semi-autoregressive blocks of these lengths,
    prompt_samplers: list[str] = field(default_factory=lambda: ["ancestral", "confidence"])   # with each sampler
    speed_length: int = 256
    speed_batches: list[int] = field(default_factory=lambda: [1, 64])
    speed_repeats: int = 1
    more_text: bool = False                # shard ../shared/data/more too (the whole 43 MB corpus)


COMMON_EVAL = ["evaluation.sample_every=0", "training.keep_last=2"]   # the last two: best and last
SCALES = {
    # configs/tiny.json (4.65 M params) on 2 CPU ranks: 400 steps x 2 x 16 x 128 = 1.64 M tokens per model.
    "cpu": Scale(config="configs/tiny.json", ranks=2,
                 train=["training.max_steps=400", "training.warmup_steps=40", "training.checkpoint_every=200",
                        "evaluation.val_every=200", "logging.log_every=20", "data.seq_len=128",
                        "deepspeed.train_micro_batch_size_per_gpu=16", *COMMON_EVAL]),
    # A 53 M-parameter DIMBA on one GPU, bf16, on the whole 43 MB corpus (11.2 M train tokens): 3000 steps x 64 x
    # 256 = 49 M tokens per model by default; benchmarks/gpu/run.sh compare S runs fewer, fitted to S seconds of
    # training (not yet run on a GPU). A GPU machine without network access gets its shards and wheels from
    # benchmarks/gpu/prepare.sh; without the judge there, evaluate with --judge none.
    "gpu": Scale(config="configs/tiny.json", ranks=None,
                 train=["model.d_model=640", "model.n_layers=8", "model.d_embed=128", "model.d_state=64",
                        "model.headdim=64", "model.chunk_size=256", "data.seq_len=256", "data.num_workers=4",
                        "training.max_steps=3000", "training.warmup_steps=200", "training.lr=0.001",
                        "training.precision=bf16", "training.ema_decay=0.99", "training.checkpoint_every=1000",
                        "evaluation.val_every=1000", "logging.log_every=50",
                        "deepspeed.train_micro_batch_size_per_gpu=64", *COMMON_EVAL],
                 samples=64, prompts=64, infill_windows=256, lik_seqs=256, t_samples=32, gen_batch=64, speed_repeats=5,
                 more_text=True),
    # Every stage at toy size (a minute or two on a CPU): checks the pipeline, measures nothing (tests use it).
    "smoke": Scale(config="configs/tiny.json", ranks=2,
                   train=["training.max_steps=4", "training.warmup_steps=1", "training.checkpoint_every=4",
                          "evaluation.val_every=0", "logging.log_every=1", "data.seq_len=32",
                          "evaluation.sample_length=16", "model.d_model=64",
                          "model.n_layers=1", "model.d_embed=16", "model.d_state=16", "model.headdim=16",
                          "model.chunk_size=16", "deepspeed.train_micro_batch_size_per_gpu=4", *COMMON_EVAL],
                   steps=[2, 4], samples=4, prompts=4, lik_seqs=8, t_samples=2, gen_batch=4, infill_steps=[1, 4],
                   infill_windows=4, guidance=[0.0, 1.0, 2.0], guidance_steps=4, prompt_blocks=[8], speed_length=32,
                   speed_batches=[1, 4]),
}


# ---- stages: data and training ------------------------------------------------------------------------------
def stage_data(out: Path, corpus: list[str]) -> None:
    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        print(f"[data] {shards} exists")
        return
    cmd = [sys.executable, str(ROOT / "data_prep" / "shard.py"), "--input", *corpus, "--tokenizer", str(TOKENIZER),
           "--output", str(shards), "--val-fraction", "0.02", "--shard-tokens", "1000000", "--no-progress"]
    print("[data]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_overrides(scale: Scale, out: Path, kind: str) -> list[str]:
    """The --set list of one model's run: the scale's settings and the objective's own; for the AR twin, the depth
    that equalises its parameter count with the masked DIMBA's (the Gaussian model, with its embedding-space
    projections, is about 6% larger at the same depth)."""
    base = [*scale.train, f"data.shards={out / 'shards'}"]
    if kind in DIFFUSION:
        return base + [f"objective={kind}"] + getattr(scale, kind)
    cfg = load_config(ROOT / scale.config, base + ["objective=masked", f"model.mask_id={MASK_ID}"])
    twin, _, _ = ar_twin(cfg)
    return base + ["objective=ar", "model.bidirectional=false", f"model.n_layers={twin.model.n_layers}"]


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "finished"


def stage_train(out: Path, scale: Scale, kind: str) -> None:
    run_dir = out / kind
    if finished(run_dir):
        print(f"[train-{kind}] {run_dir} finished")
        return
    args = ["--config", str(ROOT / scale.config), "--run-dir", str(run_dir)]
    for o in train_overrides(scale, out, kind):
        args += ["--set", o]
    cmd = deepspeed_command(str(ROOT / "launch" / "train.py"), args, scale.ranks)
    log = out / f"train-{kind}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if scale.ranks and not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // scale.ranks)))
    print(f"[train-{kind}] {' '.join(cmd)}\n[train-{kind}] log: {log}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not finished(run_dir):
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        sys.exit(f"[train-{kind}] training failed (exit {proc.returncode}): "
                 f"{errors[-1] if errors else 'see the end of ' + str(log)}")
    (run_dir / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    print(f"[train-{kind}] done in {time.time() - t0:.0f} s", flush=True)


# ---- stage: eval ----------------------------------------------------------------------------------------------
def _save(report: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def _quality(judge, tok, seqs, batch: int) -> dict:
    row = text_stats(seqs)
    if judge is not None:
        row.update(generative_perplexity(judge, tok, seqs, batch) or {})
    return row


def _val_curve(run_dir: Path) -> list[dict]:
    """(step, val/loss) of a run's periodic validation (its objective's own loss: the masked NELBO estimate, the
    AR twin's exact CE, the Gaussian x0-MSE + CE), from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "val_loss": r["val/loss"]} for r in rows if "val/loss" in r]


def stage_eval(out: Path, scale: Scale, names: list[str], judge_spec: str, device: str,
               sections: list[str] | None = None) -> None:
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    models = {k: load_model_dir(out / k, device=device) for k in names}
    checkpoints = {k: str(resolve_checkpoint(out / k).resolve()) for k in names}
    prev = report.get("checkpoints", {})
    if report and (any(prev[k] != checkpoints[k] for k in set(prev) & set(checkpoints)) or set(prev) - set(names)):
        print(f"[eval] {path} was measured on other checkpoints; starting it afresh")
        report, prev = {}, {}
    # a model added to an earlier report (e.g. --models masked,ar first, then all three): its rows are added to the
    # sections already measured, the others' rows kept
    added = [k for k in names if k not in prev] if report else []
    report["checkpoints"] = checkpoints
    first = models[names[0]]
    tok, seq_len = first.tokenizer, first.cfg.data.seq_len
    pad = first.cfg.model.pad_id
    shards = out / "shards"
    n = max(scale.lik_seqs, scale.samples, scale.prompts, scale.infill_windows)
    seqs = val_sequences(shards, tok, seq_len, n)
    todo = [name for name in SECTIONS if (sections is None or name in sections) and (name not in report or added)]
    judged = [name for name in todo if name in JUDGED]
    prior = (unigram_log_probs(shards, first.cfg.model.vocab_size, pad)                  # likelihood and context
             if {"likelihood", "context"} & set(todo) else None)
    judge = load_judge(judge_spec, device) if judge_spec != "none" and judged else None    # ~15 s: only when used
    judge_name = judge.name if judge is not None else judge_spec
    if judge is None and not judged:
        judge_name = report.get("setup", {}).get("judge", judge_spec)     # what the kept sections were scored with
    diffusion = [k for k in names if k in DIFFUSION]

    report["setup"] = {
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "judge": judge_name, "val_windows": len(seqs), "seq_len": seq_len, "scale": dataclasses.asdict(scale),
        "tokenizer_sha256": tok.sha256,
        "models": {k: {"objective": m.cfg.objective, "parameters": count_parameters(m.model),
                       "n_layers": m.cfg.model.n_layers, "d_model": m.cfg.model.d_model, "step": m.step,
                       **_training_record(out / k), "val_curve": _val_curve(out / k)} for k, m in models.items()}}
    _save(report, path)

    def section(name: str, fn):
        if name in report and not added:
            print(f"[eval] {name}: in report.json")
            return
        t0 = time.time()
        which = added if name in report else names
        print(f"[eval] {name} ({', '.join(which)}) ...", flush=True)
        rows = fn(which)
        if name not in report:
            report[name] = rows
        elif isinstance(rows, dict):
            report[name].update(rows)
        else:
            report[name] += rows
        report.setdefault("eval_wall_s", {})[name] = time.time() - t0
        _save(report, path)
        print(f"[eval] {name} done in {time.time() - t0:.0f} s", flush=True)

    keep = ("kind", "nll_nats_per_token", "bits_per_token", "stderr_nats", "tokens", "sequences")

    def likelihood(which):
        """Each model's bound (or exact NLL) at its last checkpoint and at every earlier kept one; `best` is the
        checkpoint with the lowest, as early stopping would keep."""
        batches = as_batches(seqs[:scale.lik_seqs], 8)
        rows = {}
        for k in which:
            per_ckpt = []
            for ckpt in sorted((out / k / "checkpoints").glob("step-*")):
                if not (ckpt / "COMPLETE").is_file():
                    continue
                m = models[k] if str(ckpt.resolve()) == checkpoints[k] else load_model_dir(ckpt, device=device)
                r = m.objective.likelihood(m.model, batches, scale.t_samples, 0, device)
                per_ckpt.append({"step": m.step, **{f: r[f] for f in keep}, "ppl": r.get("ppl", r.get("ppl_bound")),
                                 "raw": r})
                print(f"[eval]   {k} step {m.step}: {r['nll_nats_per_token']:.4f} nats/token ({r['kind']})",
                      flush=True)
            last, best = per_ckpt[-1], min(per_ckpt, key=lambda r: r["nll_nats_per_token"])
            row = {f: last[f] for f in (*keep, "ppl", "step")}
            row["best"] = {f: best[f] for f in (*keep, "ppl", "step")}
            row["by_checkpoint"] = [{f: c[f] for f in ("step", "nll_nats_per_token", "stderr_nats", "ppl")}
                                    for c in per_ckpt]
            raw = last["raw"]
            if k == "gaussian":
                row["terms"] = {"reconstruction": raw["reconstruction"], "diffusion": raw["diffusion"],
                                "prior": raw["prior"], "t0_log_snr": raw["t0"]["log_snr"],
                                "x0_estimate": raw["x0_estimate"], "by_estimator": raw["by_estimator"],
                                "diffusion_by_log_snr": raw["diffusion_by_log_snr"]}
            rows[k] = row
        if which == names:
            uni = unigram_nll(prior, batches, pad)
            rows["unigram"] = {**{f: uni[f] for f in keep}, "ppl": uni["ppl"]}
        return rows

    def context(which):
        from dimba.objectives.gaussian.context import context_use
        d = models["gaussian"]
        return context_use(d.model, d.objective.schedule, as_batches(seqs[:scale.lik_seqs], 8), pad, prior,
                           device=device)

    def generation(which):
        held_out = seqs[:scale.samples].tolist()
        rows = [{"model": "data", "steps": None, **_quality(judge, tok, held_out, scale.gen_batch)}] \
            if which == names else []
        uncond = [Request(prefix=[], middle_length=seq_len) for _ in range(scale.samples)]
        for kind in which:
            m = models[kind]
            for steps in m.objective.step_counts(scale.steps, seq_len):
                samp = m.objective.with_steps(m.cfg.sampling, steps)
                res, _ = generate(m.model, m.cfg, uncond, samp, seed=1, batch_size=scale.gen_batch, device=device)
                toks = [r.middle for r in res]
                rows.append({"model": kind, "steps": steps, "sampler": samp.sampler,
                             **_quality(judge, tok, toks, scale.gen_batch),
                             "examples": [tok.decode(t) for t in toks[:2]]})
                print(f"[eval]   {kind} T={steps}: entropy {rows[-1]['unigram_entropy_bits']:.2f}, "
                      f"gen-PPL {rows[-1].get('gen_ppl')}", flush=True)
        if "masked" in which:      # the other masked sampler, at each T (the config's is ancestral)
            m = models["masked"]
            for steps in scale.steps:
                samp = replace(m.objective.with_steps(m.cfg.sampling, steps), sampler="confidence")
                res, _ = generate(m.model, m.cfg, uncond, samp, seed=1, batch_size=scale.gen_batch, device=device)
                toks = [r.middle for r in res]
                rows.append({"model": "masked", "steps": steps, "sampler": "confidence",
                             **_quality(judge, tok, toks, scale.gen_batch),
                             "examples": [tok.decode(t) for t in toks[:2]]})
                print(f"[eval]   masked confidence T={steps}: entropy {rows[-1]['unigram_entropy_bits']:.2f}, "
                      f"gen-PPL {rows[-1].get('gen_ppl')}", flush=True)
        return rows

    def infill_rows(which):
        windows = seqs[:scale.infill_windows]
        rows = []
        # each model twice: its own sampler (a draw from its distribution) and its best guess (argmax picks), the
        # decoding position-wise accuracy should be read at
        for kind in [k for k in diffusion if k in which]:
            m = models[kind]
            for steps in scale.infill_steps:
                samp = m.objective.with_steps(m.cfg.sampling, steps)
                for decoding, cfg in (("sampled", samp), ("greedy", m.objective.best_guess(samp))):
                    rows.append({"model": kind, "steps": steps, "decoding": decoding, "sampler": cfg.sampler,
                                 **infill(m.model, m.cfg, tok, windows, cfg, 2, scale.gen_batch, device)})
        if "ar" in which:
            a = models["ar"]
            own = a.objective.sampling(a.cfg.sampling)
            for decoding, cfg in (("sampled", own), ("greedy", a.objective.best_guess(own))):
                rows.append({"model": "ar", "steps": None, "decoding": decoding, "sampler": cfg.sampler,
                             **infill(a.model, a.cfg, tok, windows, cfg, 2, scale.gen_batch, device)})
        return rows

    def guidance(which):
        """Prompted continuations (prompt = first half) at each guidance scale s, with the prompt gain."""
        windows = seqs[:scale.prompts]
        half = seq_len // 2
        requests = [Request(prefix=w[:half].tolist(), middle_length=seq_len - half) for w in windows]
        truth = [tok.decode(w[half:]) for w in windows]
        rows = []
        runs = [(k, s, 0, None) for k in diffusion if k in which for s in scale.guidance] + \
            [("masked", s, b, sampler) for s in scale.guidance if s >= 1 for b in scale.prompt_blocks
             for sampler in scale.prompt_samplers if "masked" in which] + \
            ([("ar", None, 0, None)] if "ar" in which else [])
        for kind, s, blocks, sampler in runs:
            m = models[kind]
            samp = m.objective.sampling(m.cfg.sampling)
            if s is not None:
                samp = replace(m.objective.with_steps(samp, scale.guidance_steps), guidance=s, block_length=blocks,
                               sampler=sampler or samp.sampler)
            res, _ = generate(m.model, m.cfg, requests, samp, seed=3, batch_size=scale.gen_batch, device=device)
            cont = [r.middle for r in res]
            full = [r.request.prefix + r.middle for r in res]
            row = {"model": kind, "guidance": s, "steps": scale.guidance_steps if s is not None else None,
                   "sampler": samp.sampler, "block_length": blocks, **text_stats(cont),
                   "bleu": bleu([tok.decode(c) for c in cont], truth)}
            if judge is not None:
                row.update(generative_perplexity(judge, tok, full, scale.gen_batch) or {})
                row.update(prompt_gain(judge, tok, [r.prefix for r in requests], cont, scale.gen_batch))
            row["example"] = {"prompt": tok.decode(requests[0].prefix), "continuation": tok.decode(cont[0])}
            rows.append(row)
            print(f"[eval]   {kind} {samp.sampler} s={s} blocks {blocks or '-'}: entropy {row['unigram_entropy_bits']:.2f}, gen-PPL {row.get('gen_ppl')}, "
                  f"prompt gain {row.get('prompt_gain_nats')} +- {row.get('prompt_gain_se')}", flush=True)
        return rows

    def sampling(which):
        uncond = [Request(prefix=[], middle_length=seq_len) for _ in range(scale.samples)]
        rows = []
        for kind in which:
            m = models[kind]
            levers = LEVERS.get(kind, []) + (X0_LEVERS if kind == "gaussian" and m.cfg.model.x0_head != "linear"
                                             else [])
            for label, change in levers:
                samp = replace(m.objective.with_steps(m.cfg.sampling, scale.guidance_steps), **change)
                res, _ = generate(m.model, m.cfg, uncond, samp, seed=1, batch_size=scale.gen_batch, device=device)
                toks = [r.middle for r in res]
                rows.append({"model": kind, "lever": label, "steps": samp.steps if m.objective.parallel else seq_len,
                             **_quality(judge, tok, toks, scale.gen_batch)})
                print(f"[eval]   {kind} {label}: entropy {rows[-1]['unigram_entropy_bits']:.2f}, "
                      f"gen-PPL {rows[-1].get('gen_ppl')}", flush=True)
        return rows

    def speed(which):
        on_gpu = torch.device(device).type == "cuda"      # bf16 there, as a GPU user samples; a copy: the
        pair = {k: (copy.deepcopy(m.model).to(torch.bfloat16) if on_gpu else m.model, m.cfg)   # rest stays fp32
                for k, m in models.items() if k in which}
        return speed_rows(pair, scale.steps, scale.speed_batches, scale.speed_length, scale.speed_repeats, device,
                          log=lambda msg: print("[eval]  ", msg, flush=True))

    for name, fn in (("likelihood", likelihood), ("context", context), ("generation", generation),
                     ("infill", infill_rows), ("guidance", guidance), ("speed", speed), ("sampling", sampling)):
        if name == "context" and "gaussian" not in (added if name in report else names):
            continue
        if sections is None or name in sections:
            section(name, fn)


def _training_record(run_dir: Path) -> dict:
    """Tokens read, median training tokens/s and wall time of a finished run (from its metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seen = [r["tokens_seen"] for r in rows if "tokens_seen" in r]
    speed = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    wall = run_dir / "wall_s.txt"
    return {"tokens_trained": int(seen[-1]) if seen else None,
            "train_tokens_per_s": speed[len(speed) // 2] if speed else None,
            "train_wall_s": float(wall.read_text()) if wall.is_file() else None}


# ---- stage: report ----------------------------------------------------------------------------------------------
def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)] + \
           ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]


def best_qualifying(gen: list[dict], model: str = "gaussian") -> dict | None:
    """The generation section's row of `model` that the gen-PPL goal counts: the lowest gen-PPL among T <= 64 with
    unigram entropy >= 0.95x the held-out text's (None: no such row, or no judge). Rows of reports written before
    the masked objective name the Gaussian model "dimba"."""
    data = next(r for r in gen if r["model"] == "data")
    names = {model, "dimba"} if model == "gaussian" else {model}
    ok = [r for r in gen if r["model"] in names and r["steps"] <= 64
          and r["unigram_entropy_bits"] >= 0.95 * data["unigram_entropy_bits"] and r.get("gen_ppl")]
    return min(ok, key=lambda r: r["gen_ppl"]) if ok else None


GEN_GOAL = "gen-PPL <= 1.3x AR (T <= 64, entropy >= 0.95x data)"


def goals(report: dict) -> list[dict]:
    """The goals, for each diffusion model, each with its measured value and whether it is met."""
    out = []
    lik, gen, speed = report.get("likelihood"), report.get("generation"), report.get("speed")
    fill, guide = report.get("infill"), report.get("guidance")
    names = [k for k in DIFFUSION if k in report["setup"]["models"]]
    for k in names:
        if lik and k in lik:
            r, rb = lik[k]["ppl"] / lik["ar"]["ppl"], lik[k]["best"]["ppl"] / lik["ar"]["best"]["ppl"]
            out.append({"goal": f"{k}: val PPL bound <= 1.2x AR exact (last / best checkpoints)",
                        "value": f"{r:.2f}x / {rb:.2f}x", "met": r <= 1.2})
        if gen:
            ar = next(r for r in gen if r["model"] == "ar")
            best = best_qualifying(gen, k)
            if ar.get("gen_ppl") is None:
                out.append({"goal": f"{k}: {GEN_GOAL}", "value": "no judge", "met": False})
            elif best is None:
                out.append({"goal": f"{k}: {GEN_GOAL}",
                            "value": "no row with T <= 64 reaches 0.95x the data's entropy", "met": False})
            else:
                r = best["gen_ppl"] / ar["gen_ppl"]
                out.append({"goal": f"{k}: {GEN_GOAL}",
                            "value": f"{r:.2f}x at T={best['steps']} ({best.get('sampler', '')})", "met": r <= 1.3})
        if speed:
            for batch in sorted({r["batch"] for r in speed}):
                ar = next((r for r in speed if r["model"] == "ar" and r["batch"] == batch), None)
                d = next((r for r in speed if r["model"] == k and r["batch"] == batch and r["steps"] == 32), None)
                if ar and d:
                    r = ar["latency_s"] / d["latency_s"]
                    out.append({"goal": f"{k}: latency, {d['length']} tokens, T=32, batch {batch}: >= 4x lower than "
                                        f"AR ({report['setup']['device']})", "value": f"{r:.2f}x", "met": r >= 4})
        if fill and any(r["model"] == k for r in fill):
            # read at the best guess (argmax) of both sides where measured; reports before it hold sampled rows only
            how = "greedy" if any(r.get("decoding") == "greedy" for r in fill) else "sampled"
            rows = [r for r in fill if r.get("decoding", "sampled") == how]
            ar = next(r for r in rows if r["model"] == "ar")["prefix_only"]["token_accuracy"]
            best = max((r for r in rows if r["model"] == k), key=lambda r: r["with_suffix"]["token_accuracy"])
            mine = best["with_suffix"]
            acc, floor = mine["token_accuracy"], best.get("mode_baseline", 0.0)
            # above the floor by two standard errors of the paired per-window difference where measured
            over, se = mine.get("over_mode", acc - floor), mine.get("over_mode_se", 0.0)
            out.append({"goal": f"{k}: infill token accuracy (prefix+suffix) >= 2x AR (prefix only), above the "
                                f"most-frequent-token baseline by 2 s.e. ({how} decoding)",
                        "value": f"{acc:.3f} vs {ar:.3f} = {acc / max(ar, 1e-9):.2f}x at T={best['steps']} "
                                 f"(baseline {floor:.3f}; {over:+.3f} +- {se:.3f} over it)",
                        "met": acc >= 2 * ar and over - 2 * se > 0})
        if guide and any(r.get("prompt_gain_nats") is not None for r in guide):
            ar_row = next(r for r in guide if r["model"] == "ar")
            ar = ar_row.get("prompt_gain_nats")
            pm = lambda r: f" +- {r['prompt_gain_se']:.3f}" if r.get("prompt_gain_se") is not None else ""  # noqa: E731
            mine = [r for r in guide if r["model"] == k and r.get("prompt_gain_nats") is not None]
            plain = next((r for r in mine if r["guidance"] == 1.0 and not r.get("block_length")), None)
            if ar and plain:
                best = max(mine, key=lambda r: r["prompt_gain_nats"])
                out.append({"goal": f"{k}: prompt gain >= 0.8x AR's (s = 1 / best s)",
                            "value": f"{plain['prompt_gain_nats']:.3f}{pm(plain)} vs {ar:.3f}{pm(ar_row)} nats = "
                                     f"{plain['prompt_gain_nats'] / ar:.2f}x / {best['prompt_gain_nats'] / ar:.2f}x "
                                     f"at s={best['guidance']}" + (f", blocks of {best['block_length']}"
                                                                   if best.get("block_length") else "")
                                     + (f", {best['sampler']}" if best.get("sampler") not in (None, plain.get(
                                         "sampler")) else ""),
                            "met": plain["prompt_gain_nats"] >= 0.8 * ar})
    return out


def write_markdown(report: dict, path: Path) -> None:
    s = report["setup"]
    md = [f"# Gaussian and masked DIMBA vs their autoregressive twin ({s['device']})", "",
          f"Judge: {s['judge']}. Val windows of {s['seq_len']} tokens: {s['val_windows']}. Tokenizer sha256 "
          f"{str(s.get('tokenizer_sha256'))[:12]}.", ""]
    md += _table(["model", "objective", "parameters", "layers", "d_model", "steps", "tokens trained",
                  "train tokens/s", "train wall s"],
                 [[k, m.get("objective", m.get("kind")), m["parameters"], m["n_layers"], m["d_model"], m["step"],
                   m["tokens_trained"], m["train_tokens_per_s"], m["train_wall_s"]] for k, m in s["models"].items()])
    if "likelihood" in report:
        lik = report["likelihood"]
        md += ["", "## Validation likelihood (last checkpoint; best of the kept checkpoints beside it)", ""]
        md += _table(["model", "estimate", "nats/token", "+-", "PPL", "best step", "best PPL"],
                     [[k, v["kind"], v["nll_nats_per_token"], v["stderr_nats"], v["ppl"],
                       v.get("best", {}).get("step"), v.get("best", {}).get("ppl")] for k, v in lik.items()])
        terms = lik.get("gaussian", lik.get("dimba", {})).get("terms")
        if terms:   # where the bound's nats go (all windows; the bound above is on the held-out half)
            md += ["", f"The Gaussian bound = reconstruction {terms['reconstruction']:.3f} (token CE at its t0, log-SNR "
                   f"{terms['t0_log_snr']:g}) + diffusion {terms['diffusion']:.3f} + prior {terms['prior']:.3f} "
                   f"nats/token, with x0 estimated by {terms['x0_estimate'].replace('_', ' ')}"
                   + "".join(f"; {k.replace('_', ' ')} alone: {v['nll_nats_per_token']:.3f}"
                             for k, v in terms["by_estimator"].items())
                   + ". The diffusion term by band of log-SNR (a band counts only below the t0 chosen):", ""]
            bands = terms["diffusion_by_log_snr"]
            edge = lambda v: "-inf" if v is None else f"{v:.3g}"   # noqa: E731
            md += _table(["log-SNR", *[f"{edge(b.get('log_snr_from'))}..{edge(b['log_snr_to'])}" for b in bands]],
                         [["nats/token", *[b["nats_per_token"] for b in bands]]])
    if "context" in report:
        md += ["", "## Does the Gaussian denoiser read its context? (token CE in nats at fixed log-SNR)", "",
               "bayes: the exact posterior of a token from its own noisy vector and the train split's unigram "
               "prior (no context); shuffled: the model with the positions permuted. context gain = bayes - model: "
               "what the model earns beyond the best context-free guess (< 0: its own token posterior is off by "
               "more than the context earns it); order gain = shuffled - model: what word order earns it.", ""]
        md += _table(["log-SNR", "t", "model", "shuffled", "bayes (no context)", "context gain", "order gain"],
                     [[r["log_snr"], r["t"], r["model_ce"], r["shuffled_ce"], r["bayes_ce"], r["context_gain"],
                       r["order_gain"]] for r in report["context"]])
    if "generation" in report:
        md += ["", f"## Unconditional samples ({s['scale']['samples']} x {s['seq_len']} tokens)", ""]
        md += _table(["model", "sampler", "T", "gen-PPL", "unigram entropy (bits)", "distinct-2", "seq-rep-4"],
                     [[r["model"], r.get("sampler"), r["steps"], r.get("gen_ppl"), r["unigram_entropy_bits"],
                       r["distinct_2"], r["repetition_rate"]] for r in report["generation"]])
        md += ["", "Examples:", ""] + [f"- {r['model']} T={r['steps']}: {r['examples'][0][:300]!r}"
                                       for r in report["generation"] if r.get("examples")]
    if "infill" in report:
        md += ["", "## Infilling (middle half hidden)", ""]
        md += ["greedy: argmax picks (masked: the confidence sampler), each model's best guess, the decoding "
               "position-wise accuracy is read at (at T = 1 a diffusion model writes each position's argmax in one "
               "pass); sampled: a draw from the model at its sampling temperature. +-: standard errors over "
               "windows; minus baseline: accuracy minus the most-frequent-token baseline, window by window.", ""]
        rows = [["(most frequent token everywhere)", None, None, None, report["infill"][0].get("mode_baseline"),
                 None, None, None, None]]
        for r in report["infill"]:
            for how in ("with_suffix", "prefix_only"):
                if how in r:
                    rows.append([r["model"], r["steps"], r.get("decoding", "sampled"), how,
                                 r[how]["token_accuracy"], r[how].get("token_accuracy_se"), r[how].get("over_mode"),
                                 r[how].get("over_mode_se"), r[how]["bleu"]])
        md += _table(["model", "T", "decoding", "context", "token accuracy", "+-", "minus baseline", "+-", "BLEU"],
                     rows)
    if "guidance" in report:
        md += ["", "## Prompted samples (prompt = first half), classifier-free guidance s", "",
               "prompt gain: the judge's NLL of a continuation after another sample's prompt minus after its own, "
               "nats per continuation token (about 0: the continuation ignores its prompt); +-: its standard error "
               "over the prompts.", ""]
        md += _table(["model", "sampler", "s", "T", "blocks", "gen-PPL (prompt+continuation)",
                      "entropy of continuations", "seq-rep-4", "BLEU vs truth", "prompt gain", "+-"],
                     [[r["model"], r.get("sampler"), r["guidance"], r["steps"], r.get("block_length") or None,
                       r.get("gen_ppl"),
                       r["unigram_entropy_bits"],
                       r["repetition_rate"], r["bleu"], r.get("prompt_gain_nats"), r.get("prompt_gain_se")]
                      for r in report["guidance"]])
    if "sampling" in report:
        md += ["", "## Sampling levers (unconditional, no retraining)", ""]
        md += _table(["model", "lever", "T", "gen-PPL", "unigram entropy (bits)", "seq-rep-4"],
                     [[r["model"], r["lever"], r["steps"], r.get("gen_ppl"), r["unigram_entropy_bits"],
                       r["repetition_rate"]] for r in report["sampling"]])
    if "speed" in report:
        md += ["", "## Generation speed", ""]
        md += _table(["model", "T", "batch", "tokens", "latency s", "tokens/s", "AR latency / this"],
                     [[r["model"], r["steps"], r["batch"], r["length"], r["latency_s"], r["tokens_per_s"],
                       r["ar_over_this"]] for r in ar_speedup(report["speed"])])
    md += ["", "## Goals", ""]
    md += _table(["goal", "measured", "met"], [[g["goal"], g["value"], "yes" if g["met"] else "no"]
                                               for g in goals(report)])
    path.write_text("\n".join(md) + "\n")


def plot(report: dict, path: Path) -> bool:
    """The quality-vs-latency and guidance panels of the sections that ran; False (no file) where none did."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gen, speed, guide = report.get("generation", []), report.get("speed", []), report.get("guidance", [])
    # a panel only where its sections ran: quality vs latency needs both gen-PPL and latency
    batches = sorted({r["batch"] for r in speed}) if any(r.get("gen_ppl") for r in gen) else []
    guided = any(r.get("gen_ppl") for r in guide)            # gen-PPL needs a judge (not with --judge none)
    panels = len(batches) + guided
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = axes[0]
    data = next((r for r in gen if r["model"] == "data"), {})
    for ax, batch in zip(axes, batches):
        lat = {(r["model"], r["steps"]): r["latency_s"] for r in speed if r["batch"] == batch}
        for name, style in (("gaussian", "o-"), ("dimba", "o-"), ("masked", "^-")):
            d = [(lat[(name, r["steps"])], r.get("gen_ppl"), r["steps"]) for r in gen
                 if r["model"] == name and r.get("sampler") in (None, "ddim", "ancestral")
                 and (name, r["steps"]) in lat and r.get("gen_ppl")]
            if d:
                ax.plot([x for x, _, _ in d], [y for _, y, _ in d], style,
                        label=f"{'gaussian' if name == 'dimba' else name} DIMBA (T steps)")
                for x, y, t in d:
                    ax.annotate(f"T={t}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ar_gen = next((r for r in gen if r["model"] == "ar"), None)
        ar_lat = next((v for (k, _), v in lat.items() if k == "ar"), None)
        if ar_gen and ar_gen.get("gen_ppl") and ar_lat:
            ax.plot([ar_lat], [ar_gen["gen_ppl"]], "s", color="C3", label="AR twin")
        if data.get("gen_ppl"):
            ax.axhline(data["gen_ppl"], color="gray", ls="--", label="held-out text")
        length = next((r["length"] for r in speed), "?")
        ax.set(xscale="log", yscale="log", xlabel=f"latency to generate {length} tokens, batch {batch} (s)",
               ylabel=f"gen-PPL ({report['setup']['judge']})", title=f"quality vs latency, batch {batch}")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if guided:
        ax = axes[-1]
        for name, color in (("gaussian", "C0"), ("dimba", "C0"), ("masked", "C1")):
            lines = sorted({(r.get("block_length", 0), r.get("sampler") or "") for r in guide if r["model"] == name})
            for blocks, sampler in lines:
                g = [r for r in guide if r["model"] == name and r.get("block_length", 0) == blocks
                     and (r.get("sampler") or "") == sampler and r.get("gen_ppl")]
                if not g:
                    continue
                ax.plot([r["guidance"] for r in g], [r["gen_ppl"] for r in g], "o-" if not blocks else "s--",
                        color=color, alpha=1.0 if sampler in ("", "ancestral", "ddim") else 0.5,
                        label=f"{'gaussian' if name == 'dimba' else name}"
                              f"{f', blocks of {blocks}, {sampler}' if blocks else ''}: gen-PPL")
                ax.set(xlabel="guidance s", ylabel="gen-PPL of prompted samples", yscale="log",
                       title=f"classifier-free guidance (T={g[0]['steps']})")
        ar = next((r for r in guide if r["model"] == "ar" and r.get("gen_ppl")), None)
        if ar:
            ax.axhline(ar["gen_ppl"], color="C3", ls=":", label="AR twin")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def stage_report(out: Path) -> None:
    report = json.loads((out / "report.json").read_text())
    write_markdown(report, out / "report.md")
    plotted = plot(report, out / "compare.png")
    print((out / "report.md").read_text())
    print(f"[report] {out / 'report.md'}" + (f", {out / 'compare.png'}" if plotted else ""))


STAGES = ("data", "train-gaussian", "train-masked", "train-ar", "eval", "report")
SECTIONS = ("likelihood", "context", "generation", "infill", "guidance", "speed", "sampling")
JUDGED = ("generation", "guidance", "sampling")          # the sections that score text with the judge


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--stage", choices=STAGES + ("all",), default="all")
    ap.add_argument("--out", default=None, help="output folder (default runs/compare-SCALE)")
    ap.add_argument("--corpus", default=None,
                    help=f"text files/glob to shard (default {SHARED_CORPUS} if present, else {BUNDLED_CORPUS})")
    ap.add_argument("--judge", default=SMOLLM2,
                    help="'smollm2' (default), a DIMBA-stack AR model folder, or 'none' (no gen-PPL)")
    ap.add_argument("--device", default=None, help="eval device (default cuda if available)")
    ap.add_argument("--gaussian-set", "--dimba-set", dest="gaussian_set", action="append", default=[],
                    metavar="KEY=VALUE", help="extra Gaussian DIMBA training override (a lever to try; use a new --out)")
    ap.add_argument("--masked-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra masked DIMBA training override (a lever to try; use a new --out)")
    ap.add_argument("--set", dest="train_set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra training override for every model (e.g. training.max_steps=800: more tokens)")
    ap.add_argument("--scale-set", action="append", default=[], metavar="FIELD=JSON",
                    help="change one of the scale's eval settings, e.g. --scale-set 'steps=[8,32]' "
                         "--scale-set 'guidance=[1.0,2.0]' (fields of Scale: samples, prompts, steps, ...)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"which models to train and compare, comma-separated (default {','.join(MODELS)}; ar always)")
    ap.add_argument("--ar-from", default=None, metavar="OUT",
                    help="reuse the shards and the trained AR twin of an earlier comparison (links them)")
    ap.add_argument("--sections", default=None, help="eval only these sections, comma-separated "
                    "(likelihood,generation,infill,guidance,speed,sampling)")
    args = ap.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS) if args.sections else set()
    if unknown:
        sys.exit(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    scale = SCALES[args.scale]
    if args.ar_from and args.train_set:
        sys.exit("--set changes every model; --ar-from reuses a trained twin: use --gaussian-set / --masked-set, or "
                 "train all afresh")
    models = [m for m in MODELS if m in args.models.split(",") or m == "ar"]
    bad = set(args.models.split(",")) - set(MODELS)
    if bad:
        sys.exit(f"--models: unknown {sorted(bad)}; choose from {','.join(MODELS)}")
    scale = replace(scale, train=scale.train + args.train_set, gaussian=scale.gaussian + args.gaussian_set,
                    masked=scale.masked + args.masked_set)
    for item in args.scale_set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Scale)} or key in ("config", "train", "gaussian", "masked"):
            sys.exit(f"--scale-set {item!r}: not an eval setting of the scale; see Scale in {__file__}")
        try:
            scale = replace(scale, **{key: json.loads(value)})
        except json.JSONDecodeError:
            sys.exit(f"--scale-set {item!r}: the value must be JSON, e.g. 'steps=[8,32]'")
    out = Path(args.out or ROOT / "runs" / f"compare-{args.scale}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.ar_from:
        for name in ("shards", "ar"):
            src, dst = Path(args.ar_from).resolve() / name, out / name
            if not src.exists():
                sys.exit(f"--ar-from {args.ar_from}: no {name}/ there; run the full comparison into it first")
            if not dst.exists():
                dst.symlink_to(src)
    if args.corpus:
        corpus = [args.corpus]
    elif SHARED_CORPUS.parent.is_dir():
        corpus = [str(SHARED_CORPUS)] + ([str(SHARED_MORE)] if scale.more_text else [])
    else:
        corpus = [str(BUNDLED_CORPUS)]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.stage.startswith("train-") and args.stage.split("-", 1)[1] not in models:
        sys.exit(f"--stage {args.stage}: that model is not among --models {args.models}")
    for stage in stages:
        if stage == "data":
            stage_data(out, corpus)
        elif stage.startswith("train-"):
            if stage.split("-", 1)[1] in models:
                stage_train(out, scale, stage.split("-", 1)[1])
        elif stage == "eval":
            stage_eval(out, scale, models, args.judge, device, args.sections.split(",") if args.sections else None)
        else:
            stage_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
