"""The token-scaling benchmark (benchmarks/token_scaling.py): its table and its lines, on hand-made compare_ar
reports (each budget's training is compare_ar.py itself, tested end to end in test_compare_ar.py)."""
import json
import math
import subprocess
import sys

import pytest

from tests.launch import ROOT, env, load_script

load_script("benchmarks/compare_ar.py")              # token_scaling imports it by name
token_scaling = load_script("benchmarks/token_scaling.py")


def report(tokens, dimba, ar, gen=None):
    """compare_ar's report.json, cut to what the scaling table reads."""
    r = {"setup": {"models": {"dimba": {"tokens_trained": tokens}, "ar": {"tokens_trained": tokens}}},
         "likelihood": {"dimba": {"nll_nats_per_token": dimba, "stderr_nats": 0.2},
                        "ar": {"nll_nats_per_token": ar, "stderr_nats": 0.1},
                        "unigram": {"nll_nats_per_token": 6.4, "stderr_nats": 0.05}},
         "context": [{"log_snr": -3, "context_gain": 0.05}, {"log_snr": -2, "context_gain": 0.11}]}
    if gen:
        r["generation"] = [{"model": "data", "steps": None, "unigram_entropy_bits": 8.5, "gen_ppl": 42.0},
                           {"model": "dimba", "steps": 16, "unigram_entropy_bits": gen[1], "gen_ppl": gen[0]},
                           {"model": "ar", "steps": 128, "unigram_entropy_bits": 8.6, "gen_ppl": gen[2]}]
    return r


def write_budgets(out, budgets):
    for steps, rep in budgets.items():
        (out / f"steps-{steps}").mkdir(parents=True)
        (out / f"steps-{steps}" / "report.json").write_text(json.dumps(rep))


def test_the_lines_and_where_the_gap_meets_the_goal():
    # DIMBA gains 0.3 nats per doubling, the twin 0.2: the gap of 1.0 nats at 1 M tokens shrinks by 0.1 a doubling
    rows = [token_scaling.budget_row(report(2 ** k * 1e6, 7.0 - 0.3 * k, 6.0 - 0.2 * k)) for k in range(3)]
    assert [r["gap_nats"] for r in rows] == pytest.approx([1.0, 0.9, 0.8])
    assert rows[1]["ppl_ratio"] == pytest.approx(math.exp(0.9))
    assert rows[0]["context_gain"] == {-3: 0.05, -2: 0.11}
    line = token_scaling.fit(rows)
    assert line["dimba_nats_per_doubling"] == pytest.approx(-0.3)
    assert line["gap_nats_per_doubling"] == pytest.approx(-0.1)
    # the gap is 1.0 - 0.1 log2(tokens / 1 M): it reaches ln 1.2 after (1.0 - ln 1.2) / 0.1 doublings
    assert line["goal_tokens"] == pytest.approx(1e6 * 2 ** ((1.0 - math.log(1.2)) / 0.1), rel=1e-6)
    # a widening gap has no meeting point; one budget has no line
    wide = [token_scaling.budget_row(report(2 ** k * 1e6, 7.0 - 0.1 * k, 6.0 - 0.2 * k)) for k in range(3)]
    assert token_scaling.fit(wide)["goal_tokens"] is None
    assert token_scaling.fit(rows[:1]) is None


def test_report_stage_tables_what_was_run(tmp_path):
    write_budgets(tmp_path, {100: report(409600, 6.8, 4.6, gen=(3000.0, 8.3, 300.0)),
                             200: report(819200, 6.5, 4.2, gen=(2500.0, 7.9, 300.0)),   # 7.9 < 0.95 x 8.5 bits
                             300: report(1228800, 6.4, 4.1, gen=(None, 8.3, None))})  # --judge none
    cmd = [sys.executable, "benchmarks/token_scaling.py", "--stage", "report", "--out", str(tmp_path),
           "--steps", "100,200,300,400"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "steps-400: no likelihood result yet" in proc.stdout
    md = (tmp_path / "scaling.md").read_text()
    assert "| 0.41 M | 6.800 (0.20) | 4.6 | 6.4 | 2.2 |" in md
    assert "| +0.050 / +0.110 |" in md and "3e+03 @ 8.30 (16)" in md
    assert "none qualifies" in md                                    # the second budget's row misses the entropy
    assert "| 1.23 M |" in md and "no judge" in md
    assert "the gap does not close" in md                            # 2.2 -> 2.3 nats
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert [b["tokens"] for b in result["budgets"]] == [409600, 819200, 1228800]
    # gaps 2.2 / 2.3 / 2.3 nats at log2(tokens) 18.64 / 19.64 / 20.23: least squares 0.067 nats per doubling
    assert result["fit"]["gap_nats_per_doubling"] == pytest.approx(0.0671, abs=1e-3)
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--steps", "100,x"], "give whole numbers of steps"),
    (["--steps", "1"], "at least 2 steps"),
    (["--steps", "100", "--stage", "report"], "no budget measured under"),
])
def test_bad_arguments_get_one_line(tmp_path, args, message):
    cmd = [sys.executable, "benchmarks/token_scaling.py", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr
