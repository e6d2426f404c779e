#!/usr/bin/env python
"""Does the gap between a DIMBA model and its AR twin close with training tokens? One comparison per budget.

    python benchmarks/token_scaling.py                          # masked vs AR. CPU: 100, 200, 400 steps = 0.41,
                                                                #   0.82, 1.64 M tokens per model
    python benchmarks/token_scaling.py --model gaussian         # Gaussian vs AR (benchmarks/results/token-scaling-cpu.md)
    python benchmarks/token_scaling.py --steps 100,200,400,800  # adds 3.28 M tokens (about 80 min more)
    python benchmarks/token_scaling.py --stage report           # the table from the budgets already run

Each budget N is one full benchmarks/compare_ar.py run in OUT/steps-N (default OUT: runs/scaling-SCALE): both
models trained afresh on the same shards with training.max_steps=N, warmup N/10, checkpoint and validation at
N/2 (the recipe of the 3.28 M-token comparison in benchmarks/levers.md), then its likelihood, context and
generation sections. compare_ar skips what is done, so re-running continues where it stopped.

The table, per budget: DIMBA's likelihood bound and the twin's exact NLL (nats/token, on the same val windows),
the train split's unigram model (no context), the gap and its PPL ratio, the denoiser's context gain at log-SNR
-3 and -2 (dimba.objectives.gaussian.context) and the qualifying gen-PPL row of the goal. Then a least-squares line of
nats against log2(tokens) for each model: nats gained per doubling, and where the two lines would bring the gap
to the goal (<= ln 1.2 nats). A line through a few small budgets is a rough guide, not a scaling law: it says
which way the gap moves and how fast, here.
-> OUT/scaling.json, OUT/scaling.md, OUT/scaling.png
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

import compare_ar

ROOT = compare_ar.ROOT
GOAL_NATS = math.log(1.2)       # the bound goal: DIMBA's PPL <= 1.2x the twin's
SECTIONS = "likelihood,context,generation"
CONTEXT_LOG_SNR = (-3, -2)      # where the denoiser's context gain is largest once it reads context at all


def run_budget(out: Path, steps: int, scale: str, judge: str, extra: list[str], model: str) -> None:
    overrides = [f"training.max_steps={steps}", f"training.warmup_steps={max(1, steps // 10)}",
                 f"training.checkpoint_every={max(1, steps // 2)}", f"evaluation.val_every={max(1, steps // 2)}",
                 *extra]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_ar.py"), "--scale", scale, "--out", str(out),
           "--judge", judge, "--sections", SECTIONS if model == "gaussian" else SECTIONS.replace("context,", ""),
           "--models", model]
    for o in overrides:
        cmd += ["--set", o]
    print(f"[scaling] {steps} steps: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def budget_row(report: dict, model: str = "gaussian") -> dict:
    """One budget's numbers from its compare_ar report.json: `model` (gaussian or masked; reports written before
    the masked objective name the Gaussian model "dimba") against the twin. Keys say "dimba" for that model."""
    lik = report["likelihood"]
    name = model if model in lik else "dimba"
    d, a, u = (lik[k]["nll_nats_per_token"] for k in (name, "ar", "unigram"))
    row = {"tokens": report["setup"]["models"][name]["tokens_trained"], "dimba_nats": d, "ar_nats": a,
           "unigram_nats": u, "dimba_stderr": lik[name]["stderr_nats"], "gap_nats": d - a,
           "ppl_ratio": math.exp(d - a)}
    ctx = report.get("context")
    if ctx:
        row["context_gain"] = {r["log_snr"]: r["context_gain"] for r in ctx if r["log_snr"] in CONTEXT_LOG_SNR}
    gen = report.get("generation")
    if gen:
        ar = next(r for r in gen if r["model"] == "ar")
        q = compare_ar.best_qualifying(gen, model if name == model else "gaussian")    # "dimba": the Gaussian
        row.update(ar_gen_ppl=ar.get("gen_ppl"), ar_entropy=ar["unigram_entropy_bits"],
                   dimba_gen_ppl=q["gen_ppl"] if q else None, dimba_gen_steps=q["steps"] if q else None,
                   dimba_entropy=q["unigram_entropy_bits"] if q else None,
                   gen_ratio=q["gen_ppl"] / ar["gen_ppl"] if q and ar.get("gen_ppl") else None)
    return row


def fit(rows: list[dict]) -> dict | None:
    """Least-squares lines nats = a + b log2(tokens) for DIMBA and the twin, and where the gap would meet the goal."""
    if len({r["tokens"] for r in rows}) < 2:
        return None
    x = np.log2([r["tokens"] for r in rows])
    lines = {k: np.polyfit(x, [r[f"{k}_nats"] for r in rows], 1) for k in ("dimba", "ar")}
    slope = {k: float(v[0]) for k, v in lines.items()}
    gap_slope = slope["dimba"] - slope["ar"]
    gap_at = float(lines["dimba"][1] - lines["ar"][1])          # gap at log2(tokens) = 0
    out = {"dimba_nats_per_doubling": slope["dimba"], "ar_nats_per_doubling": slope["ar"],
           "gap_nats_per_doubling": gap_slope, "goal_tokens": None}
    if gap_slope < 0:
        out["goal_tokens"] = float(2 ** ((GOAL_NATS - gap_at) / gap_slope))
    return out


def _gen_cell(r: dict) -> str | None:
    """The table's DIMBA gen-PPL cell: the qualifying row, or why there is none."""
    if "ar_entropy" not in r:
        return None                                     # no generation section
    if r["ar_gen_ppl"] is None:
        return "no judge"
    if r["dimba_gen_ppl"] is None:
        return "none qualifies"
    return f"{compare_ar._fmt(r['dimba_gen_ppl'])} @ {r['dimba_entropy']:.2f} ({r['dimba_gen_steps']})"


def write(out: Path, rows: list[dict], line: dict | None, model: str) -> str:
    f = compare_ar._fmt
    md = [f"# {model.capitalize()} DIMBA vs its AR twin against training tokens", "",
          f"DIMBA here is the {model} objective. Per model: tokens trained; bound / exact NLL in nats per token on the same val windows "
          "(benchmarks/compare_ar.py's likelihood section); gap = DIMBA - AR (goal <= ln 1.2 = 0.182); "
          "context gain: the denoiser's, at log-SNR -3 / -2 (dimba.objectives.gaussian.context); gen-PPL: the goal's "
          "qualifying DIMBA row (T <= 64, entropy >= 0.95x the data's) against the twin's samples.", ""]
    md += compare_ar._table(
        ["tokens", "DIMBA bound (+-)", "AR exact", "unigram", "gap", "PPL ratio", "context gain at -3 / -2",
         "DIMBA gen-PPL @ bits (T)", "AR gen-PPL @ bits", "gen ratio"],
        [[f"{r['tokens'] / 1e6:.2f} M", f"{r['dimba_nats']:.3f} ({r['dimba_stderr']:.2f})", r["ar_nats"],
          r["unigram_nats"], r["gap_nats"], r["ppl_ratio"],
          " / ".join(f"{r['context_gain'][k]:+.3f}" for k in CONTEXT_LOG_SNR) if "context_gain" in r else None,
          _gen_cell(r),
          f"{f(r['ar_gen_ppl'])} @ {r['ar_entropy']:.2f}" if r.get("ar_gen_ppl") else None, r.get("gen_ratio")]
         for r in rows])
    if line:
        md += ["", f"Least-squares lines of nats against log2(tokens): DIMBA {line['dimba_nats_per_doubling']:+.3f} "
               f"nats per doubling, the twin {line['ar_nats_per_doubling']:+.3f}, the gap "
               f"{line['gap_nats_per_doubling']:+.3f}."]
        md[-1] += (f" Along these lines the gap reaches the goal at about {line['goal_tokens']:.3g} tokens per model."
                   if line["goal_tokens"] else " Along these lines the gap does not close.")
    text = "\n".join(md) + "\n"
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(json.dumps({"model": model, "budgets": rows, "fit": line}, indent=1))
    plot(out / "scaling.png", rows, model)
    return text


def plot(path: Path, rows: list[dict], model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    tokens = [r["tokens"] for r in rows]
    ax.errorbar(tokens, [r["dimba_nats"] for r in rows], yerr=[r["dimba_stderr"] for r in rows], fmt="o-",
                label=f"{model} DIMBA (bound)")
    ax.plot(tokens, [r["ar_nats"] for r in rows], "s-", label="AR twin (exact)")
    ax.plot(tokens, [r["unigram_nats"] for r in rows], ":", color="gray", label="unigram model (no context)")
    ax.set(xscale="log", xlabel="tokens trained per model", ylabel="val NLL (nats/token)",
           title=f"{model.capitalize()} DIMBA vs its AR twin against training tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(compare_ar.SCALES), default="cpu")
    ap.add_argument("--steps", default="100,200,400", help="training steps of each budget, comma-separated")
    ap.add_argument("--stage", choices=("all", "report"), default="all",
                    help="all: run the missing budgets, then the report; report: only the report")
    ap.add_argument("--out", default=None, help="output folder (default runs/scaling-SCALE)")
    ap.add_argument("--judge", default=compare_ar.SMOLLM2, help="as compare_ar.py's --judge")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra training override for both models at every budget")
    ap.add_argument("--model", choices=("masked", "gaussian"), default="masked",
                    help="the DIMBA model set against the AR twin (default masked)")
    args = ap.parse_args()
    try:
        budgets = sorted({int(s) for s in args.steps.split(",")})
    except ValueError:
        sys.exit(f"--steps {args.steps!r}: give whole numbers of steps, comma-separated (e.g. 100,200,400)")
    if not budgets or budgets[0] < 2:
        sys.exit(f"--steps {args.steps!r}: every budget needs at least 2 steps")
    out = Path(args.out or ROOT / "runs" / f"scaling-{args.scale}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for steps in budgets:
        run = out / f"steps-{steps}"
        if args.stage == "all":
            run_budget(run, steps, args.scale, args.judge, args.extra, args.model)
        path = run / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        if "likelihood" not in report:
            print(f"[scaling] {run}: no likelihood result yet; run without --stage report to measure it")
            continue
        rows.append(budget_row(report, args.model))
    if not rows:
        sys.exit(f"[scaling] no budget measured under {out}; run it without --stage report first")
    print(write(out, rows, fit(rows), args.model))
    print(f"[scaling] {out / 'scaling.md'}, {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
