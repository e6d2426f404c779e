#!/usr/bin/env python
"""DIMBA against its autoregressive twin: equal parameters, equal tokens, the same shards; quality and speed.

    python benchmarks/compare_ar.py                         # CPU scale (50 min on 2 cores: data 1 s, train
                                                            #   736 + 637 s, eval 27 min of which speed 17)
    python benchmarks/compare_ar.py --scale gpu --judge none --set training.max_steps=N   # one GPU; on a lent
                                                            #   one through benchmarks/gpu/run.sh compare S, which
                                                            #   fits N to S seconds of training
    python benchmarks/compare_ar.py --stage report          # redraw the table and the PNG from report.json

Stages, in order (each skipped when its result exists, so re-running continues; training resumes):
  data         data_prep/shard.py on --corpus (default ../shared/data/gutenberg, at the GPU scale with
               ../shared/data/more too; else the bundled corpus), with
               the committed 4096-piece tokenizer, into OUT/shards (2% of the documents held out as val)
  train-dimba  deepspeed launch/train.py: the scale's DIMBA config (with diffusion.cond_dropout for guidance)
  train-ar     the same command for the AR twin: dimba.model.build.ar_twin picks the depth that equalises the
               parameter count; same steps, micro-batch, ranks and seq_len, hence the same tokens, same shards
  eval         both models (EMA weights), on held-out windows of the val split:
                 likelihood   DIMBA: ELBO upper bound (dimba.evaluation.likelihood), with its terms and the
                              diffusion term by band of log-SNR; AR: exact NLL -> PPL; and the exact NLL of the
                              train split's unigram model (the best a model that reads no context can do)
                 context      DIMBA: what its context earns the denoiser at each noise level, against the
                              exact context-free posterior (dimba.evaluation.context)
                 generation   unconditional samples, DIMBA at each T, AR decode of the same length: unigram
                              entropy, seq-rep-4 and gen-PPL under the judge (default SmolLM2-135M-Instruct Q4_1,
                              an AR model trained on ~2T tokens of other text), beside held-out text's
                 infill       middle half hidden: DIMBA with prefix+suffix, DIMBA and AR with the prefix only
                 guidance     prompted DIMBA samples at guidance s (classifier-free), AR continuations beside
                 speed        latency / tokens/s of generating --speed-length tokens at batch 1 and 64:
                              DIMBA at each T vs AR recurrent decode of the same length
               -> OUT/report.json (written after every section)
  report       OUT/report.md (tables + goals) and OUT/compare.png (quality against latency)

Equal tokens: both runs train max_steps x micro-batch x ranks x seq_len tokens. DIMBA's loss skips clean
(prompt) positions, so it is graded on slightly fewer tokens than it reads; both read the same ones.
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
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dimba.config import load_config  # noqa: E402
from dimba.data.shards import unigram_log_probs  # noqa: E402
from dimba.evaluation.context import context_use  # noqa: E402
from dimba.evaluation.infill import infill  # noqa: E402
from dimba.evaluation.judge import SMOLLM2, generative_perplexity, load_judge  # noqa: E402
from dimba.evaluation.likelihood import ar_exact_nll, elbo_bound, unigram_nll  # noqa: E402
from dimba.evaluation.prompted import bleu  # noqa: E402
from dimba.evaluation.speed import ar_speedup, speed_rows  # noqa: E402
from dimba.evaluation.textgen import Request, generate, schedule_for  # noqa: E402
from dimba.evaluation.textstats import text_stats  # noqa: E402
from dimba.evaluation.valdata import as_batches, val_sequences  # noqa: E402
from dimba.model.build import ar_twin, count_parameters  # noqa: E402
from dimba.training.distributed import deepspeed_command  # noqa: E402
from dimba.training.export import load_model_dir, resolve_checkpoint  # noqa: E402

TOKENIZER = ROOT / "data_prep" / "tokenizer" / "tokenizer.model"
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "gutenberg" / "*.txt"
SHARED_MORE = ROOT.parent / "shared" / "data" / "more" / "*.txt.gz"     # 31 MB more prose (gzip)
BUNDLED_CORPUS = ROOT / "data_prep" / "corpus" / "*.txt"
KINDS = ("dimba", "ar")
# eval-time levers (no retraining), unconditional samples at the guidance section's T; temperature and top_p rows
# are repeated for the AR twin (same options, same meaning: its token pick).
SAMPLING_LEVERS = [("config (ddim, uniform, top_p 0.95)", {}), ("spacing quadratic", {"spacing": "quadratic"}),
                   ("spacing trailing", {"spacing": "trailing"}), ("sampler ddpm", {"sampler": "ddpm"}),
                   ("top_p 1.0", {"top_p": 1.0}), ("temperature 0.8", {"temperature": 0.8}),
                   ("temperature 0.9", {"temperature": 0.9})]
X0_LEVERS = [("x0 temperature 0.7", {"x0_temperature": 0.7}), ("x0 temperature 0.5", {"x0_temperature": 0.5}),
             ("x0 temperature 0.3", {"x0_temperature": 0.3})]          # softmax/posterior heads only


@dataclass
class Scale:
    config: str
    train: list[str]                       # overrides for both models
    dimba: list[str]                       # DIMBA only
    ranks: int | None                      # deepspeed --num_gpus (None: every GPU)
    steps: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    samples: int = 32                      # unconditional samples per row (and held-out reference windows)
    prompts: int = 32                      # prompts / infill windows
    lik_seqs: int = 64                     # val windows for the likelihood
    t_samples: int = 16                    # ELBO draws per sequence
    gen_batch: int = 32
    infill_steps: list[int] = field(default_factory=lambda: [32, 128])
    guidance: list[float] = field(default_factory=lambda: [0.0, 1.0, 1.5, 2.0, 3.0])
    guidance_steps: int = 32
    speed_length: int = 256
    speed_batches: list[int] = field(default_factory=lambda: [1, 64])
    speed_repeats: int = 1
    more_text: bool = False                # shard ../shared/data/more too (the whole 43 MB corpus)


COMMON_EVAL = ["evaluation.sample_every=0", "training.keep_last=1"]
SCALES = {
    # configs/tiny.json (4.65 M params) on 2 CPU ranks: 400 steps x 2 x 16 x 128 = 1.64 M tokens per model.
    "cpu": Scale(config="configs/tiny.json", ranks=2,
                 train=["training.max_steps=400", "training.warmup_steps=40", "training.checkpoint_every=200",
                        "evaluation.val_every=200", "logging.log_every=20", "data.seq_len=128",
                        "deepspeed.train_micro_batch_size_per_gpu=16", *COMMON_EVAL],
                 dimba=["diffusion.cond_dropout=0.1"]),
    # A 53 M-parameter DIMBA on one GPU, bf16, on the whole 43 MB corpus (11.2 M train tokens): 3000 steps x 64 x
    # 256 = 49 M tokens per model by default; a lent GPU (15 minutes a task) runs fewer, fitted to a time budget by
    # benchmarks/gpu/run.sh (not yet run: no GPU was lent to the sessions that wrote it). The GPU machine reaches no
    # registry or data: benchmarks/gpu/prepare.sh writes the shards and wheels to carry; without the judge there,
    # evaluate with --judge none.
    "gpu": Scale(config="configs/tiny.json", ranks=None,
                 train=["model.d_model=640", "model.n_layers=8", "model.d_embed=128", "model.d_state=64",
                        "model.headdim=64", "model.chunk_size=256", "data.seq_len=256", "data.num_workers=4",
                        "training.max_steps=3000", "training.warmup_steps=200", "training.lr=0.001",
                        "training.precision=bf16", "training.ema_decay=0.99", "training.checkpoint_every=1000",
                        "evaluation.val_every=1000", "logging.log_every=50",
                        "deepspeed.train_micro_batch_size_per_gpu=64", *COMMON_EVAL],
                 dimba=["diffusion.cond_dropout=0.1"],
                 samples=64, prompts=64, lik_seqs=256, t_samples=32, gen_batch=64, speed_repeats=5, more_text=True),
    # Every stage at toy size (a minute or two on a CPU): checks the pipeline, measures nothing (tests use it).
    "smoke": Scale(config="configs/tiny.json", ranks=2,
                   train=["training.max_steps=4", "training.warmup_steps=1", "training.checkpoint_every=4",
                          "evaluation.val_every=0", "logging.log_every=1", "data.seq_len=32",
                          "evaluation.sample_length=16", "model.d_model=64",
                          "model.n_layers=1", "model.d_embed=16", "model.d_state=16", "model.headdim=16",
                          "model.chunk_size=16", "deepspeed.train_micro_batch_size_per_gpu=4", *COMMON_EVAL],
                   dimba=["diffusion.cond_dropout=0.1"],
                   steps=[2, 4], samples=4, prompts=4, lik_seqs=8, t_samples=2, gen_batch=4, infill_steps=[4],
                   guidance=[0.0, 1.0, 2.0], guidance_steps=4, speed_length=32, speed_batches=[1, 4]),
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
    """The --set list of one model's run: the scale's settings; for the AR twin, its equal-parameter depth."""
    base = [*scale.train, f"data.shards={out / 'shards'}"]
    if kind == "dimba":
        return base + scale.dimba
    cfg = load_config(ROOT / scale.config, base)
    twin, _, _ = ar_twin(cfg.model)
    return base + ["model.kind=ar", "model.bidirectional=false", f"model.n_layers={twin.n_layers}"]


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


def stage_eval(out: Path, scale: Scale, judge_spec: str, device: str, sections: list[str] | None = None) -> None:
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    models = {k: load_model_dir(out / k, device=device) for k in KINDS}
    checkpoints = {k: str(resolve_checkpoint(out / k).resolve()) for k in KINDS}
    if report and report.get("checkpoints") != checkpoints:
        print(f"[eval] {path} was measured on other checkpoints; starting it afresh")
        report = {}
    report["checkpoints"] = checkpoints
    tok = models["dimba"].tokenizer
    cfg_d = models["dimba"].cfg
    seq_len = cfg_d.data.seq_len
    shards = out / "shards"
    n = max(scale.lik_seqs, scale.samples, scale.prompts)
    seqs = val_sequences(shards, tok, seq_len, n)
    todo = [name for name in SECTIONS if (sections is None or name in sections) and name not in report]
    judged = [name for name in todo if name in JUDGED]
    prior = (unigram_log_probs(shards, cfg_d.model.vocab_size, cfg_d.model.pad_id)     # likelihood and context
             if {"likelihood", "context"} & set(todo) else None)
    judge = load_judge(judge_spec, device) if judge_spec != "none" and judged else None    # ~15 s: only when used
    judge_name = judge.name if judge is not None else judge_spec
    if judge is None and not judged:
        judge_name = report.get("setup", {}).get("judge", judge_spec)     # what the kept sections were scored with

    report["setup"] = {
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "judge": judge_name, "val_windows": len(seqs), "seq_len": seq_len, "scale": dataclasses.asdict(scale),
        "models": {k: {"kind": m.cfg.model.kind, "parameters": count_parameters(m.model),
                       "n_layers": m.cfg.model.n_layers, "d_model": m.cfg.model.d_model, "step": m.step,
                       **_training_record(out / k)} for k, m in models.items()}}
    _save(report, path)

    def section(name: str, fn):
        if name in report:
            print(f"[eval] {name}: in report.json")
            return
        t0 = time.time()
        print(f"[eval] {name} ...", flush=True)
        report[name] = fn()
        report.setdefault("eval_wall_s", {})[name] = time.time() - t0
        _save(report, path)
        print(f"[eval] {name} done in {time.time() - t0:.0f} s", flush=True)

    def likelihood():
        lik = seqs[:scale.lik_seqs]
        d = models["dimba"]
        bound = elbo_bound(d.model, schedule_for(d.cfg), as_batches(lik, 8), d.cfg.model.pad_id, d.cfg.diffusion.t_min,
                           scale.t_samples, 0, device)
        exact = ar_exact_nll(models["ar"].model, as_batches(lik, 8), models["ar"].cfg.model.pad_id, device)
        keep = ("kind", "nll_nats_per_token", "bits_per_token", "stderr_nats", "tokens", "sequences")
        terms = {"reconstruction": bound["reconstruction"], "diffusion": bound["diffusion"], "prior": bound["prior"],
                 "t0_log_snr": bound["t0"]["log_snr"], "x0_estimate": bound["x0_estimate"],
                 "by_estimator": bound["by_estimator"], "diffusion_by_log_snr": bound["diffusion_by_log_snr"]}
        uni = unigram_nll(prior, as_batches(lik, 8), d.cfg.model.pad_id)
        return {"dimba": {**{k: bound[k] for k in keep}, "ppl": bound["ppl_bound"], "terms": terms},
                "ar": {**{k: exact[k] for k in keep}, "ppl": exact["ppl"]},
                "unigram": {**{k: uni[k] for k in keep}, "ppl": uni["ppl"]}}

    def context():
        d = models["dimba"]
        return context_use(d.model, schedule_for(d.cfg), as_batches(seqs[:scale.lik_seqs], 8), d.cfg.model.pad_id,
                           prior, device=device)

    def generation():
        held_out = seqs[:scale.samples].tolist()
        rows = [{"model": "data", "steps": None, **_quality(judge, tok, held_out, scale.gen_batch)}]
        uncond = [Request(prefix=[], middle_length=seq_len) for _ in range(scale.samples)]
        for kind in KINDS:
            m = models[kind]
            for steps in (scale.steps if kind == "dimba" else [seq_len]):
                res, _ = generate(m.model, m.cfg, uncond, replace(m.cfg.sampling, steps=steps), seed=1,
                                  batch_size=scale.gen_batch, device=device)
                toks = [r.middle for r in res]
                rows.append({"model": kind, "steps": steps, **_quality(judge, tok, toks, scale.gen_batch),
                             "examples": [tok.decode(t) for t in toks[:2]]})
                print(f"[eval]   {kind} T={steps}: entropy {rows[-1]['unigram_entropy_bits']:.2f}, "
                      f"gen-PPL {rows[-1].get('gen_ppl')}", flush=True)
        return rows

    def infill_rows():
        windows = seqs[:scale.prompts]
        rows = []
        for steps in scale.infill_steps:
            d = models["dimba"]
            rows.append({"model": "dimba", "steps": steps, **infill(d.model, d.cfg, tok, windows,
                                                                     replace(d.cfg.sampling, steps=steps), 2,
                                                                     scale.gen_batch, device)})
        a = models["ar"]
        rows.append({"model": "ar", "steps": None, **infill(a.model, a.cfg, tok, windows, a.cfg.sampling, 2,
                                                             scale.gen_batch, device)})
        return rows

    def guidance():
        windows = seqs[:scale.prompts]
        half = seq_len // 2
        requests = [Request(prefix=w[:half].tolist(), middle_length=seq_len - half) for w in windows]
        truth = [tok.decode(w[half:]) for w in windows]
        rows = []
        runs = [("dimba", s) for s in scale.guidance] + [("ar", None)]
        for kind, s in runs:
            m = models[kind]
            samp = m.cfg.sampling
            if kind == "dimba":
                samp = replace(samp, steps=scale.guidance_steps, guidance=s)
            res, _ = generate(m.model, m.cfg, requests, samp, seed=3, batch_size=scale.gen_batch, device=device)
            cont = [r.middle for r in res]
            full = [r.request.prefix + r.middle for r in res]
            row = {"model": kind, "guidance": s, "steps": scale.guidance_steps if kind == "dimba" else None,
                   **text_stats(cont), "bleu": bleu([tok.decode(c) for c in cont], truth)}
            if judge is not None:
                row.update(generative_perplexity(judge, tok, full, scale.gen_batch) or {})
            row["example"] = {"prompt": tok.decode(requests[0].prefix), "continuation": tok.decode(cont[0])}
            rows.append(row)
            print(f"[eval]   {kind} s={s}: entropy {row['unigram_entropy_bits']:.2f}, gen-PPL {row.get('gen_ppl')}",
                  flush=True)
        return rows

    def sampling():
        uncond = [Request(prefix=[], middle_length=seq_len) for _ in range(scale.samples)]
        rows = []
        levers = SAMPLING_LEVERS + (X0_LEVERS if models["dimba"].cfg.model.x0_head != "linear" else [])
        for label, change in levers:
            for kind in KINDS:
                if kind == "ar" and not set(change) <= {"temperature", "top_p"}:
                    continue                               # sampler/spacing/T mean nothing to the AR decoder
                m = models[kind]
                samp = replace(m.cfg.sampling, **change, **({"steps": scale.guidance_steps} if kind == "dimba" else {}))
                res, _ = generate(m.model, m.cfg, uncond, samp, seed=1, batch_size=scale.gen_batch, device=device)
                toks = [r.middle for r in res]
                rows.append({"model": kind, "lever": label, "steps": samp.steps if kind == "dimba" else seq_len,
                             **_quality(judge, tok, toks, scale.gen_batch)})
                print(f"[eval]   {kind} {label}: entropy {rows[-1]['unigram_entropy_bits']:.2f}, "
                      f"gen-PPL {rows[-1].get('gen_ppl')}", flush=True)
        return rows

    def speed():
        on_gpu = torch.device(device).type == "cuda"      # bf16 there, as a GPU user samples; a copy: the
        pair = {k: (copy.deepcopy(m.model).to(torch.bfloat16) if on_gpu else m.model, m.cfg)   # rest stays fp32
                for k, m in models.items()}
        return speed_rows(pair, scale.steps, scale.speed_batches, scale.speed_length, scale.speed_repeats, device,
                          log=lambda msg: print("[eval]  ", msg, flush=True))

    for name, fn in (("likelihood", likelihood), ("context", context), ("generation", generation),
                     ("infill", infill_rows), ("guidance", guidance), ("speed", speed), ("sampling", sampling)):
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


def best_qualifying(gen: list[dict]) -> dict | None:
    """The generation section's DIMBA row that the gen-PPL goal counts: the lowest gen-PPL among T <= 64 with
    unigram entropy >= 0.95x the held-out text's (None: no such row, or no judge)."""
    data = next(r for r in gen if r["model"] == "data")
    ok = [r for r in gen if r["model"] == "dimba" and r["steps"] <= 64
          and r["unigram_entropy_bits"] >= 0.95 * data["unigram_entropy_bits"] and r.get("gen_ppl")]
    return min(ok, key=lambda r: r["gen_ppl"]) if ok else None


def goals(report: dict) -> list[dict]:
    """The issue's goals, each with its measured value and whether it is met."""
    out = []
    lik = report.get("likelihood")
    if lik:
        r = lik["dimba"]["ppl"] / lik["ar"]["ppl"]
        out.append({"goal": "val PPL: DIMBA bound <= 1.2x AR exact", "value": f"{r:.2f}x", "met": r <= 1.2})
    gen = report.get("generation")
    if gen:
        ar = next(r for r in gen if r["model"] == "ar")
        best = best_qualifying(gen)
        if ar.get("gen_ppl") is None:
            out.append({"goal": "gen-PPL <= 1.3x AR (T <= 64, entropy >= 0.95x data)", "value": "no judge", "met": False})
        elif best is None:
            out.append({"goal": "gen-PPL <= 1.3x AR (T <= 64, entropy >= 0.95x data)",
                        "value": "no DIMBA row with T <= 64 reaches 0.95x the data's entropy", "met": False})
        else:
            r = best["gen_ppl"] / ar["gen_ppl"]
            out.append({"goal": "gen-PPL <= 1.3x AR (T <= 64, entropy >= 0.95x data)",
                        "value": f"{r:.2f}x at T={best['steps']}", "met": r <= 1.3})
    speed = report.get("speed")
    if speed:
        for batch in sorted({r["batch"] for r in speed}):
            ar = next((r for r in speed if r["model"] == "ar" and r["batch"] == batch), None)
            d = next((r for r in speed if r["model"] == "dimba" and r["batch"] == batch and r["steps"] == 32), None)
            if ar and d:
                r = ar["latency_s"] / d["latency_s"]
                out.append({"goal": f"latency, {d['length']} tokens, T=32, batch {batch}: DIMBA >= 4x lower than AR "
                                    f"({report['setup']['device']})", "value": f"{r:.2f}x", "met": r >= 4})
    fill = report.get("infill")
    if fill:
        ar = next(r for r in fill if r["model"] == "ar")["prefix_only"]["token_accuracy"]
        best = max((r for r in fill if r["model"] == "dimba"), key=lambda r: r["with_suffix"]["token_accuracy"])
        acc = best["with_suffix"]["token_accuracy"]
        floor = best.get("mode_baseline", 0.0)
        out.append({"goal": "infill token accuracy: DIMBA (prefix+suffix) >= 2x AR (prefix only), above the "
                            "most-frequent-token baseline",
                    "value": f"{acc:.3f} vs {ar:.3f} = {acc / max(ar, 1e-9):.2f}x at T={best['steps']} "
                             f"(baseline {floor:.3f})",
                    "met": acc >= 2 * ar and acc > ar and acc > floor})
    return out


def write_markdown(report: dict, path: Path) -> None:
    s = report["setup"]
    md = [f"# DIMBA vs its autoregressive twin ({s['device']})", "",
          f"Judge: {s['judge']}. Val windows of {s['seq_len']} tokens: {s['val_windows']}.", ""]
    md += _table(["model", "parameters", "layers", "d_model", "steps", "tokens trained", "train tokens/s",
                  "train wall s"],
                 [[k, m["parameters"], m["n_layers"], m["d_model"], m["step"], m["tokens_trained"],
                   m["train_tokens_per_s"], m["train_wall_s"]] for k, m in s["models"].items()])
    if "likelihood" in report:
        lik = report["likelihood"]
        md += ["", "## Validation likelihood", ""]
        md += _table(["model", "estimate", "nats/token", "+-", "PPL"],
                     [[k, v["kind"], v["nll_nats_per_token"], v["stderr_nats"], v["ppl"]] for k, v in lik.items()])
        terms = lik.get("dimba", {}).get("terms")
        if terms:   # where the bound's nats go (all windows; the bound above is on the held-out half)
            md += ["", f"DIMBA's bound = reconstruction {terms['reconstruction']:.3f} (token CE at its t0, log-SNR "
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
        md += ["", "## Does DIMBA's denoiser read its context? (token CE in nats at fixed log-SNR)", "",
               "bayes: the exact posterior of a token from its own noisy vector and the train split's unigram "
               "prior (no context); shuffled: the model with the positions permuted. context gain = bayes - model: "
               "what the model earns beyond the best context-free guess (< 0: its own token posterior is off by "
               "more than the context earns it); order gain = shuffled - model: what word order earns it.", ""]
        md += _table(["log-SNR", "t", "model", "shuffled", "bayes (no context)", "context gain", "order gain"],
                     [[r["log_snr"], r["t"], r["model_ce"], r["shuffled_ce"], r["bayes_ce"], r["context_gain"],
                       r["order_gain"]] for r in report["context"]])
    if "generation" in report:
        md += ["", f"## Unconditional samples ({s['scale']['samples']} x {s['seq_len']} tokens)", ""]
        md += _table(["model", "T", "gen-PPL", "unigram entropy (bits)", "distinct-2", "seq-rep-4"],
                     [[r["model"], r["steps"], r.get("gen_ppl"), r["unigram_entropy_bits"], r["distinct_2"],
                       r["repetition_rate"]] for r in report["generation"]])
        md += ["", "Examples:", ""] + [f"- {r['model']} T={r['steps']}: {r['examples'][0][:300]!r}"
                                       for r in report["generation"] if r.get("examples")]
    if "infill" in report:
        md += ["", "## Infilling (middle half hidden)", ""]
        rows = [["(most frequent token everywhere)", None, None, report["infill"][0].get("mode_baseline"), None]]
        for r in report["infill"]:
            for how in ("with_suffix", "prefix_only"):
                if how in r:
                    rows.append([r["model"], r["steps"], how, r[how]["token_accuracy"], r[how]["bleu"]])
        md += _table(["model", "T", "context", "token accuracy", "BLEU"], rows)
    if "guidance" in report:
        md += ["", "## Prompted samples (prompt = first half), classifier-free guidance s", ""]
        md += _table(["model", "s", "T", "gen-PPL (prompt+continuation)", "entropy of continuations", "seq-rep-4",
                      "BLEU vs truth"],
                     [[r["model"], r["guidance"], r["steps"], r.get("gen_ppl"), r["unigram_entropy_bits"],
                       r["repetition_rate"], r["bleu"]] for r in report["guidance"]])
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


def plot(report: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gen, speed = report.get("generation", []), report.get("speed", [])
    batches = sorted({r["batch"] for r in speed})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5.2 * (len(batches) + 1), 4.2), squeeze=False)
    axes = axes[0]
    data = next((r for r in gen if r["model"] == "data"), {})
    for ax, batch in zip(axes, batches):
        lat = {(r["model"], r["steps"]): r["latency_s"] for r in speed if r["batch"] == batch}
        d = [(lat[("dimba", r["steps"])], r.get("gen_ppl"), r["steps"]) for r in gen
             if r["model"] == "dimba" and ("dimba", r["steps"]) in lat and r.get("gen_ppl")]
        if d:
            ax.plot([x for x, _, _ in d], [y for _, y, _ in d], "o-", label="DIMBA (T steps)")
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
    ax = axes[-1]
    g = [r for r in report.get("guidance", []) if r["model"] == "dimba" and r.get("gen_ppl")]
    if g:
        ax.plot([r["guidance"] for r in g], [r["gen_ppl"] for r in g], "o-", label="gen-PPL")
        ax.set(xlabel="guidance s", ylabel="gen-PPL of prompted samples", yscale="log",
               title=f"classifier-free guidance (T={g[0]['steps']})")
        ax2 = ax.twinx()
        ax2.plot([r["guidance"] for r in g], [r["unigram_entropy_bits"] for r in g], "s--", color="C1",
                 label="unigram entropy")
        ax2.set_ylabel("unigram entropy of continuations (bits)")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_report(out: Path) -> None:
    report = json.loads((out / "report.json").read_text())
    write_markdown(report, out / "report.md")
    plot(report, out / "compare.png")
    print((out / "report.md").read_text())
    print(f"[report] {out / 'report.md'}, {out / 'compare.png'}")


STAGES = ("data", "train-dimba", "train-ar", "eval", "report")
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
    ap.add_argument("--dimba-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra DIMBA training override (a lever to try; use a new --out)")
    ap.add_argument("--set", dest="train_set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra training override for both models (e.g. training.max_steps=800: more tokens)")
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
        sys.exit("--set changes both models; --ar-from reuses a trained twin: use --dimba-set, or train both afresh")
    scale = replace(scale, train=scale.train + args.train_set, dimba=scale.dimba + args.dimba_set)
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
    for stage in stages:
        if stage == "data":
            stage_data(out, corpus)
        elif stage.startswith("train-"):
            stage_train(out, scale, stage.split("-", 1)[1])
        elif stage == "eval":
            stage_eval(out, scale, args.judge, device, args.sections.split(",") if args.sections else None)
        else:
            stage_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
