"""The GPU kit (benchmarks/gpu/run.sh) as a dry run on this CPU: the same script, steps and outputs as on one GPU,
at toy sizes. It cannot show GPU numbers; it keeps a run on a GPU from failing on
plumbing (a renamed flag, a missing output, the step fitting of `compare`)."""
import json

import pytest

from tests.launch import ROOT, run

pytestmark = pytest.mark.slow   # about 2 minutes for both modes on 2 cores


def dry_run(tmp_path, monkeypatch, *args: str) -> tuple[list[str], object]:
    monkeypatch.delenv("OUT", raising=False)      # $OUT makes it the GPU machine's run (installing the carried wheels)
    proc = run(["bash", "benchmarks/gpu/run.sh", *args], timeout=1200, extra_env={"DIMBA_RUNS": str(tmp_path)})
    out = tmp_path / "gpu-check"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == f"mode {args[0]}"
    assert json.loads(summary[1])["mixer"].startswith("no CUDA")
    return summary[2:], out


def test_check_runs_every_step_and_writes_its_measurements(tmp_path, monkeypatch):
    steps, out = dry_run(tmp_path, monkeypatch, "check")
    assert [s.split(":")[0] for s in steps] == ["tests", "speed", "train-gpu-scale", "train-125m", "mixer"]
    assert all(": exit 0 in " in s for s in steps), steps
    speed = json.loads((out / "speed.json").read_text())
    rows = {(r["model"], r["batch"]) for r in speed["rows"]}
    assert rows >= {("gaussian", 1), ("masked", 1), ("ar", 1)} and len({r["batch"] for r in speed["rows"]}) == 2
    assert all(r["latency_s"] > 0 and r["ar_over_this"] > 0 for r in speed["rows"])
    for name in ("train-gpu-scale", "train-125m"):
        (row,) = json.loads((out / f"{name}.json").read_text())
        assert row["tokens/s"] > 0 and row["step_s"] > 0
    assert "=== mixer: exit 0" in (out / "log.txt").read_text()


def test_compare_fits_its_steps_to_the_budget_and_brings_the_report_back(tmp_path, monkeypatch):
    steps, out = dry_run(tmp_path, monkeypatch, "compare", "1")
    assert [s.split(":")[0] for s in steps] == ["probe", "compare"]
    assert all(": exit 0 in " in s for s in steps), steps
    (probe,) = json.loads((out / "probe.json").read_text())
    fitted = max(20, int(1 / probe["step_s"]))
    assert f"{fitted} steps for each model" in (out / "log.txt").read_text()
    for f in ("report.json", "report.md"):
        assert (out / f).stat().st_size > 0
    assert not (out / "compare.png").exists()        # --judge none: no gen-PPL to plot
    report = json.loads((out / "report.json").read_text())
    models = report["setup"]["models"]
    assert models["gaussian"]["step"] == models["masked"]["step"] == models["ar"]["step"] == fitted
    assert models["gaussian"]["tokens_trained"] == models["masked"]["tokens_trained"] == models["ar"]["tokens_trained"] > 0
    assert {"likelihood", "context", "generation", "speed"} <= set(report)
    assert str(tmp_path) in report["checkpoints"]["masked"]     # its runs stayed under DIMBA_RUNS
