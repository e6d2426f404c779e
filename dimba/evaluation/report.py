"""Where an evaluation report goes: a JSON file, tensorboard scalars in the run directory, a PNG plot.

JSON: strict (no NaN/Infinity); a non-finite number becomes null and its place is listed under "non_finite".
Tensorboard: scalars named eval/... written to RUN_DIR/tb at the checkpoint's step, beside training's own
(tensorboard merges the event files of one folder):
    eval/nll_nats_per_token, eval/bits_per_token, eval/ppl (exact for AR, the bound for DIMBA)
    eval/denoise/loss_t{lo:.2f}-{hi:.2f}                 (DIMBA)
    eval/steps{n}/{gen_ppl, unigram_entropy_bits, distinct_2, repetition_rate, bleu, rougeL_f, tokens_per_s,
                   latency_s}
Summary: a few human lines for the console (`summary`): the likelihood beside the unigram NLL, each step count's
samples beside the held-out text, the prompt gain and infilling beside their yardsticks.
Plot: quality against sampling steps (gen PPL, unigram entropy, BLEU/ROUGE-L, tokens/s), with the held-out
text's values as dashed reference lines.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

GEN_KEYS = ("gen_ppl", "unigram_entropy_bits", "distinct_2", "repetition_rate")
PROMPT_KEYS = ("bleu", "rougeL_f")
SPEED_KEYS = ("tokens_per_s", "latency_s")


def _finite(obj: Any, where: str, bad: list[str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where)
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}" if where else k, bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def write_json(report: dict, path: str | Path) -> Path:
    bad: list[str] = []
    clean = _finite(report, "", bad)
    if bad:
        clean["non_finite"] = bad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    return path


def scalars(report: dict) -> dict[str, float]:
    """The report's headline numbers as flat eval/... scalars (finite numbers only)."""
    out: dict[str, float] = {}
    lik = report["likelihood"]
    out["eval/nll_nats_per_token"] = lik["nll_nats_per_token"]
    out["eval/bits_per_token"] = lik["bits_per_token"]
    ppl = lik.get("ppl", lik.get("ppl_bound"))
    if ppl is not None:
        out["eval/ppl"] = ppl
    for row in report.get("denoising_by_t") or []:
        out[f"eval/denoise/loss_t{row['t_lo']:.2f}-{row['t_hi']:.2f}"] = row["loss"]
    for row in report.get("context_by_snr") or []:
        for k in ("context_gain", "order_gain"):
            if row.get(k) is not None:
                out[f"eval/context/{k}_logsnr{row['log_snr']:g}"] = row[k]
    for section, keys in (("generation", GEN_KEYS), ("prompted", PROMPT_KEYS), ("speed", SPEED_KEYS)):
        for row in report.get(section, []):
            for k in keys:
                if row.get(k) is not None:
                    out[f"eval/steps{row['steps']}/{k}"] = row[k]
    for row in report.get("infill", []):
        for variant, scores in _variants(row):
            for k, v in scores.items():
                out[f"eval/steps{row['steps']}/infill_{variant}_{k}"] = v
    for variant, scores in _variants(report.get("infill_best_guess", {})):
        for k, v in scores.items():
            out[f"eval/infill_best_guess/{variant}_{k}"] = v
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def write_tensorboard(report: dict, run_dir: str | Path, step: int) -> Path:
    """Scalars (and a few sample texts) into RUN_DIR/tb at `step`; returns the tb folder."""
    from torch.utils.tensorboard import SummaryWriter
    tb = Path(run_dir) / "tb"
    writer = SummaryWriter(log_dir=str(tb))
    try:
        for k, v in scalars(report).items():
            writer.add_scalar(k, v, step)
        for row in report.get("generation", []):
            for i, text in enumerate(row.get("examples", [])):
                writer.add_text(f"eval/steps{row['steps']}/sample{i}", text, step)
    finally:
        writer.close()
    return tb


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def summary(report: dict) -> list[str]:
    """The headline numbers as short lines, each beside what it should be read against."""
    lines = []
    lik, uni = report["likelihood"], report.get("likelihood_unigram")
    what = "exact NLL" if lik["kind"] == "exact" else "NLL bound"
    se = f" ± {lik['stderr_nats']:.3f}" if lik.get("stderr_nats") is not None else ""
    ppl = lik.get("ppl", lik.get("ppl_bound"))
    line = f"{what}: {lik['nll_nats_per_token']:.3f}{se} nats/token (PPL {_num(ppl, '.1f')})"
    if uni is not None:
        gain = uni["nll_nats_per_token"] - lik["nll_nats_per_token"]
        line += (f"; unigram model {uni['nll_nats_per_token']:.3f} (PPL {_num(uni['ppl'], '.1f')}): "
                 f"context earns {gain:+.3f} nats/token")
    lines.append(line)
    ref = report.get("reference", {})
    if ref:
        lines.append(f"held-out text: unigram entropy {ref['unigram_entropy_bits']:.2f} bits"
                     + (f", gen PPL {ref['gen_ppl']:.1f}" if ref.get("gen_ppl") is not None else ""))
    prompted = {r["steps"]: r for r in report.get("prompted", [])}
    infill = {r["steps"]: r for r in report.get("infill", [])}
    speed = {r["steps"]: r for r in report.get("speed", [])}
    for row in report.get("generation", []):
        steps = row["steps"]
        parts = [f"entropy {row['unigram_entropy_bits']:.2f} bits"]
        if row.get("gen_ppl") is not None:
            ratio = f" ({row['gen_ppl'] / ref['gen_ppl']:.2f}x the text's)" if ref.get("gen_ppl") else ""
            parts.append(f"gen PPL {row['gen_ppl']:.1f}{ratio}")
        parts.append(f"repetition {row['repetition_rate']:.3f}")
        p = prompted.get(steps, {})
        if p.get("prompt_gain_nats") is not None:
            se = f" +- {p['prompt_gain_se']:.3f}" if p.get("prompt_gain_se") is not None else ""
            parts.append(f"prompt gain {p['prompt_gain_nats']:.3f}{se} nats/token")
        elif p:
            parts.append(f"BLEU {p['bleu']:.2f}")
        f = infill.get(steps, {})
        if f:
            parts.append(_infill_words(f))
        if steps in speed:
            parts.append(f"{speed[steps]['tokens_per_s']:.0f} tokens/s")
        lines.append(f"T={steps}: " + ", ".join(parts))
    best = report.get("infill_best_guess")
    if best:
        how = "greedy decoding" if best["steps"] > 1 else "one pass, each position's argmax"
        score = best.get("with_suffix", best["prefix_only"])
        lines.append(f"best-guess infill ({how}): {_infill_words(best)}, "
                     f"{score['over_mode']:+.3f} +- {score['over_mode_se']:.3f} over the most frequent token")
    return lines


def _variants(row: dict):
    """(variant, scores) of one infill row, with the suffix first where the objective reads one."""
    return [(v, row[v]) for v in ("with_suffix", "prefix_only") if v in row]


def _infill_words(row: dict) -> str:
    which, score = _variants(row)[0]
    se = f" +- {score['token_accuracy_se']:.3f}" if "token_accuracy_se" in score else ""
    return (f"infill accuracy {score['token_accuracy']:.3f}{se} {which.replace('_', ' ')} "
            f"(most frequent token {row['mode_baseline']:.3f})")


def plot(report: dict, path: str | Path) -> Path:
    """Quality and speed against sampling steps, one panel each, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen, prm, spd, ref = report["generation"], report["prompted"], report["speed"], report.get("reference", {})
    objective = report["model"].get("objective", report["model"].get("kind"))
    sequential = objective == "ar"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))

    def panel(ax, rows, keys, title, log_y=False, ref_key=None):
        for k in keys:
            pts = [(r["steps"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        if ref_key and ref.get(ref_key) is not None:
            ax.axhline(ref[ref_key], color="gray", linestyle="--", label="held-out text")
        ax.set_title(title)
        ax.set_xlabel("decoding steps (one per token)" if sequential else "sampling steps")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["steps"] for r in rows], [str(r["steps"]) for r in rows])
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    if any(r.get("gen_ppl") is not None for r in gen):
        panel(axes[0, 0], gen, ["gen_ppl"], "generative perplexity (judge)", log_y=True, ref_key="gen_ppl")
    else:
        axes[0, 0].text(0.5, 0.5, "no --judge given", ha="center", va="center")
        axes[0, 0].set_title("generative perplexity (judge)")
    panel(axes[0, 1], gen, ["unigram_entropy_bits"], "unigram entropy of samples (bits)",
          ref_key="unigram_entropy_bits")
    panel(axes[1, 0], prm, ["bleu"], "prompted continuation: BLEU (0-100)")
    ax2 = axes[1, 0].twinx()
    pts = [(r["steps"], r["rougeL_f"]) for r in prm]
    ax2.plot(*zip(*pts), marker="s", color="tab:orange", label="rougeL_f")
    ax2.set_ylabel("ROUGE-L F (0-1)")
    ax2.legend(fontsize=8, loc="lower right")
    panel(axes[1, 1], spd, ["tokens_per_s"], f"speed ({spd[0]['device'] if spd else ''})", log_y=True)
    lik = report["likelihood"]
    what = "exact NLL" if lik["kind"] == "exact" else "NLL bound"
    fig.suptitle(f"{objective} model, step {report['model']['step']}: {what} {lik['nll_nats_per_token']:.3f} nats/token")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
