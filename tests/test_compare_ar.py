"""The comparison benchmark (benchmarks/compare_ar.py: Gaussian and masked DIMBA against the AR twin): every stage
end to end at toy size with the real engine, and the goal checks on hand-made reports."""
import json
import subprocess
import sys

import pytest

from tests.launch import ROOT, env, load_script

compare_ar = load_script("benchmarks/compare_ar.py")


def test_every_stage_runs_and_the_twins_read_the_same_tokens(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "benchmarks/compare_ar.py", "--scale", "smoke", "--corpus", "data_prep/corpus/*.txt",
           "--out", str(out), "--judge", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    models = report["setup"]["models"]
    assert {k: m["objective"] for k, m in models.items()} == {"gaussian": "gaussian", "masked": "masked", "ar": "ar"}
    assert models["gaussian"]["tokens_trained"] == models["masked"]["tokens_trained"] == \
        models["ar"]["tokens_trained"] == 4 * 2 * 4 * 32
    lik = report["likelihood"]
    assert lik["gaussian"]["kind"] == "elbo_upper_bound" and lik["masked"]["kind"] == "nelbo_upper_bound"
    assert lik["ar"]["kind"] == "exact" and lik["masked"]["stderr_nats"] > 0
    assert lik["unigram"]["kind"] == "exact, no context" and 0 < lik["unigram"]["nll_nats_per_token"] < 9
    assert lik["masked"]["best"]["step"] == 4 and [c["step"] for c in lik["masked"]["by_checkpoint"]] == [4]
    terms = lik["gaussian"]["terms"]      # the bound's own terms (held-out half), and the diffusion term by band
    assert terms["reconstruction"] + terms["diffusion"] + terms["prior"] == \
        pytest.approx(lik["gaussian"]["nll_nats_per_token"])
    assert terms["t0_log_snr"] in [b["log_snr_to"] for b in terms["diffusion_by_log_snr"]]
    assert all(b["nats_per_token"] >= 0 for b in terms["diffusion_by_log_snr"])
    assert [(r["model"], r["sampler"] if r["model"] != "data" else None, r["steps"]) for r in report["generation"]] == [
        ("data", None, None), ("gaussian", "ddim", 2), ("gaussian", "ddim", 4), ("masked", "ancestral", 2),
        ("masked", "ancestral", 4), ("ar", "recurrent", 32), ("masked", "confidence", 2), ("masked", "confidence", 4)]
    assert {(r["model"], r["batch"]) for r in report["speed"]} == {(m, b) for m in ("gaussian", "masked", "ar")
                                                                    for b in (1, 4)}
    fill = {(r["model"], r["decoding"]): r for r in report["infill"]}
    assert [(r["model"], r["steps"], r["decoding"], r["sampler"]) for r in report["infill"]] == [
        (k, t, d, s) for k, own in (("gaussian", "ddim"), ("masked", "ancestral")) for t in (1, 4)
        for d, s in (("sampled", own), ("greedy", "ddim" if k == "gaussian" else "confidence"))] + [
        ("ar", None, "sampled", "recurrent"), ("ar", None, "greedy", "recurrent")]
    assert all("with_suffix" in fill[k, d] for k in ("gaussian", "masked") for d in ("sampled", "greedy"))
    assert "with_suffix" not in fill["ar", "greedy"] and all(r["windows"] == 4 for r in report["infill"])
    scores = fill["masked", "greedy"]["with_suffix"]     # per-window accuracy minus the floor, with its s.e.
    assert scores["over_mode"] == pytest.approx(scores["token_accuracy"] - fill["masked", "greedy"]["mode_baseline"])
    assert scores["token_accuracy_se"] >= 0 and scores["over_mode_se"] >= 0
    assert [(r["model"], r["sampler"], r["guidance"], r["block_length"]) for r in report["guidance"]] == [
        *[("gaussian", "ddim", s, 0) for s in (0.0, 1.0, 2.0)], *[("masked", "ancestral", s, 0) for s in (0.0, 1.0, 2.0)],
        ("masked", "ancestral", 1.0, 8), ("masked", "confidence", 1.0, 8), ("masked", "ancestral", 2.0, 8),
        ("masked", "confidence", 2.0, 8), ("ar", "recurrent", None, 0)]
    assert {r["model"] for r in report["sampling"]} == {"gaussian", "masked", "ar"}
    assert [r["log_snr"] for r in report["context"]] == [-6, -4, -3, -2, -1, 0]
    md = (out / "report.md").read_text()
    assert "## Goals" in md and "context gain" in md and "The Gaussian bound = reconstruction" in md
    assert "masked: val PPL bound" in md
    assert not (out / "compare.png").exists()          # --judge none: no gen-PPL, so no panel to draw
    # a second run finds everything done and only redraws the report
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finished" in again.stdout and "in report.json" in again.stdout


def report(ppl=(12.0, 10.0), gen=(30.0, 25.0), entropy=(9.3, 9.5), latency=(0.5, 2.5), fill=(0.3, 0.1),
           gain=(0.5, 0.6), fill_se=0.01):
    """A hand-made report of the masked model against the twin."""
    lik = lambda p: {"ppl": p, "best": {"ppl": p}}     # noqa: E731
    return {"setup": {"device": "test", "models": {"masked": {}, "ar": {}}},
            "likelihood": {"masked": lik(ppl[0]), "ar": lik(ppl[1])},
            "generation": [{"model": "data", "steps": None, "unigram_entropy_bits": 9.6, "gen_ppl": 20.0},
                           {"model": "masked", "steps": 32, "unigram_entropy_bits": entropy[0], "gen_ppl": gen[0]},
                           {"model": "masked", "steps": 128, "unigram_entropy_bits": 9.6, "gen_ppl": 1.0},
                           {"model": "ar", "steps": 128, "unigram_entropy_bits": entropy[1], "gen_ppl": gen[1]}],
            "speed": [{"model": "masked", "steps": 32, "batch": 1, "length": 256, "latency_s": latency[0]},
                      {"model": "ar", "steps": 256, "batch": 1, "length": 256, "latency_s": latency[1]}],
            "infill": [{"model": "masked", "steps": 32, "mode_baseline": 0.05,
                        "with_suffix": {"token_accuracy": fill[0], "over_mode": fill[0] - 0.05,
                                        "over_mode_se": fill_se}},
                       {"model": "ar", "steps": None, "prefix_only": {"token_accuracy": fill[1]}}],
            "guidance": [{"model": "masked", "guidance": 1.0, "prompt_gain_nats": gain[0]},
                         {"model": "masked", "guidance": 2.0, "prompt_gain_nats": gain[0] / 2},
                         {"model": "ar", "guidance": None, "prompt_gain_nats": gain[1]}]}


@pytest.mark.parametrize("kwargs, met", [
    ({}, [True, True, True, True, True]),
    ({"ppl": (12.1, 10.0)}, [False, True, True, True, True]),
    ({"gen": (33.0, 25.0)}, [True, False, True, True, True]),
    ({"entropy": (9.1, 9.5)}, [True, False, True, True, True]),      # below 0.95x the data's entropy: not counted
    ({"latency": (0.7, 2.5)}, [True, True, False, True, True]),
    ({"fill": (0.19, 0.1)}, [True, True, True, False, True]),
    ({"fill": (0.0, 0.0)}, [True, True, True, False, True]),          # nothing recovered is no win
    ({"fill": (0.04, 0.01)}, [True, True, True, False, True]),        # 4x AR but below writing "the" everywhere
    ({"fill": (0.06, 0.01), "fill_se": 0.006}, [True, True, True, False, True]),   # above it by < 2 s.e.
    ({"fill": (0.06, 0.01), "fill_se": 0.004}, [True, True, True, True, True]),    # above it by > 2 s.e.
    ({"gain": (0.4, 0.6)}, [True, True, True, True, False]),          # 0.67x the twin's prompt gain
])
def test_goals(kwargs, met):
    got = compare_ar.goals(report(**kwargs))
    assert [g["met"] for g in got] == met and all(g["goal"].startswith("masked: ") for g in got)
    assert "T=128" not in got[1]["value"]                     # T > 64 never counts for the gen-PPL goal


def test_the_prompt_gain_goal_reads_plain_sampling_and_names_the_best_row():
    """Met or not at s = 1 without blocks; the best row beside it, semi-autoregressive blocks named."""
    r = report(gain=(0.4, 0.6))
    r["guidance"].insert(2, {"model": "masked", "guidance": 1.0, "block_length": 16, "prompt_gain_nats": 0.9})
    goal = compare_ar.goals(r)[-1]
    assert not goal["met"] and goal["value"] == "0.400 vs 0.600 nats = 0.67x / 1.50x at s=1.0, blocks of 16"
    r["guidance"][0]["sampler"] = "ancestral"          # a best row with another sampler than plain's names it
    r["guidance"].insert(2, {"model": "masked", "guidance": 2.0, "block_length": 16, "prompt_gain_nats": 1.2,
                             "sampler": "confidence"})
    assert compare_ar.goals(r)[-1]["value"] == "0.400 vs 0.600 nats = 0.67x / 2.00x at s=2.0, blocks of 16, confidence"
    r["guidance"][0]["prompt_gain_se"], r["guidance"][-1]["prompt_gain_se"] = 0.05, 0.07      # standard errors shown
    assert compare_ar.goals(r)[-1]["value"].startswith("0.400 +- 0.050 vs 0.600 +- 0.070 nats = 0.67x")


def test_bench_generate_times_both_models_at_a_scale(tmp_path):
    """The speed half without training (benchmarks/bench_generate.py): DIMBA at each T and the AR twin, at each
    batch size, with the AR-over-DIMBA latency ratio the speed goal reads."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "benchmarks/bench_generate.py", "--scale", "smoke", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["steps"], r["batch"]) for r in rows] == [
        (m, t, b) for b in (1, 4) for m, t in (("gaussian", 2), ("gaussian", 4), ("masked", 2), ("masked", 4),
                                                ("ar", 32))]
    assert all(r["length"] == 32 and r["latency_s"] > 0 for r in rows)
    assert all(r["ar_over_this"] == 1.0 for r in rows if r["model"] == "ar")
    assert result["setup"]["fp32_matmul_gflops"] > 0 and result["setup"]["layers"]["masked"] == 1
    assert "AR latency / this" in proc.stdout


def test_set_changes_both_models_and_refuses_a_reused_twin(tmp_path):
    (tmp_path / "old" / "shards").mkdir(parents=True)
    (tmp_path / "old" / "ar").mkdir()
    cmd = [sys.executable, "benchmarks/compare_ar.py", "--scale", "smoke", "--out", str(tmp_path / "new"),
           "--ar-from", str(tmp_path / "old"), "--set", "training.max_steps=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--set changes every model" in proc.stderr
    scale = compare_ar.replace(compare_ar.SCALES["smoke"], train=compare_ar.SCALES["smoke"].train + ["training.max_steps=8"])
    for kind in ("gaussian", "masked", "ar"):
        cfg = compare_ar.load_config(ROOT / scale.config, compare_ar.train_overrides(scale, tmp_path, kind))
        assert cfg.training.max_steps == 8


def test_infill_goal_reads_the_greedy_rows_where_measured():
    """Position-wise accuracy is read at each side's best guess (argmax) when the report has it; the sampled rows
    beside it do not count, and a report with sampled rows only is read at those."""
    r = report(fill=(0.01, 0.01))
    r["infill"] += [{"model": "masked", "steps": 32, "decoding": "greedy", "with_suffix": {"token_accuracy": 0.3},
                     "mode_baseline": 0.05},
                    {"model": "ar", "steps": None, "decoding": "greedy", "prefix_only": {"token_accuracy": 0.1}}]
    goal = compare_ar.goals(r)[3]
    assert goal["met"] and "greedy decoding" in goal["goal"] and goal["value"].startswith("0.300 vs 0.100")
    assert "by 2 s.e." in goal["goal"] and "+0.250 +- 0.000 over it" in goal["value"]   # older rows: no s.e.
    assert not compare_ar.goals(report(fill=(0.01, 0.01)))[3]["met"]


def test_the_plot_draws_only_the_sections_with_gen_ppl(tmp_path):
    gen = [{"model": "masked", "sampler": "ancestral", "steps": t, "gen_ppl": p} for t, p in ((8, 900.0), (32, 700.0))]
    gen += [{"model": "ar", "sampler": "recurrent", "steps": 128, "gen_ppl": 400.0}, {"model": "data", "gen_ppl": 80.0}]
    speed = [{"model": m, "steps": t, "batch": 1, "length": 256, "latency_s": s}
             for m, t, s in (("masked", 8, 0.7), ("masked", 32, 2.7), ("ar", 256, 2.5))]
    guide = [{"model": "masked", "guidance": s, "steps": 32, "block_length": 0, "sampler": "ancestral",
              "gen_ppl": 400.0 - 50 * s} for s in (0.0, 1.0)] + [{"model": "ar", "gen_ppl": 150.0}]
    setup = {"judge": "a judge"}
    both = tmp_path / "both.png"
    assert compare_ar.plot({"setup": setup, "generation": gen, "speed": speed, "guidance": guide}, both)
    one = tmp_path / "one.png"            # guidance only (generation not run): one panel, half the width
    assert compare_ar.plot({"setup": setup, "speed": speed, "guidance": guide}, one)
    width = lambda p: int.from_bytes(p.read_bytes()[16:20], "big")      # noqa: E731 (PNG header)
    assert width(both) > 1.8 * width(one)
    unjudged = [{**r, "gen_ppl": None} for r in guide]
    assert not compare_ar.plot({"setup": setup, "generation": [], "speed": speed, "guidance": unjudged},
                               tmp_path / "none.png") and not (tmp_path / "none.png").exists()
