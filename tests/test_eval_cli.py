"""tools/eval.py end to end on tiny models trained here with the real trainer, and every error case."""
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT, env

TINY = ["--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.d_embed=16",
        "--set", "model.d_state=16", "--set", "model.headdim=16", "--set", "model.chunk_size=32",
        "--set", "data.seq_len=64", "--set", "deepspeed.train_micro_batch_size_per_gpu=8",
        "--set", "training.warmup_steps=2", "--set", "training.max_steps=30", "--set", "training.checkpoint_every=30",
        "--set", "evaluation.val_every=0", "--set", "evaluation.sample_every=0", "--set", "logging.log_every=10",
        "--set", "data.num_workers=0", "--set", "objective=gaussian"]
AR = ["--set", "objective=ar", "--set", "model.bidirectional=false"]
SMALL_EVAL = ["--batches", "2", "--batch-size", "4", "--t-samples", "4", "--t-buckets", "3", "--steps", "2,4",
              "--samples", "4", "--prompts", "4", "--gen-batch", "4", "--speed-repeats", "1", "--examples", "1"]
STEP = 30


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def shard(inputs: list[Path], out: Path, tokenizer: Path) -> Path:
    proc = run([sys.executable, "data_prep/shard.py", "--input", *map(str, inputs), "--tokenizer", str(tokenizer),
                "--output", str(out), "--val-fraction", "0.05", "--shard-tokens", "100000", "--no-progress",
                "--workers", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def train(run_dir: Path, shards: Path, *extra: str) -> Path:
    proc = run([sys.executable, "launch/train.py", "--config", "configs/tiny.json", "--run-dir", str(run_dir),
                "--set", f"data.shards={shards}", *TINY, *extra])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def models(bundled_shards, tmp_path_factory):
    """A DIMBA run on the bundled corpus, and an AR judge trained on other text (two of the books only)."""
    base = tmp_path_factory.mktemp("eval")
    corpus = ROOT / "data_prep" / "corpus"
    judge_shards = shard([corpus / "shakespeare-hamlet.txt", corpus / "carroll-alice.txt"], base / "judge-shards",
                         ROOT / "data_prep" / "tokenizer" / "tokenizer.model")
    return {"shards": bundled_shards, "dimba": train(base / "dimba", bundled_shards),
            "judge": train(base / "judge", judge_shards, *AR), "base": base}


def numbers(obj, where=""):
    """Every leaf of a JSON document as (path, value)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{where}[{i}]")
    else:
        yield where, obj


def test_help_explains_the_tool():
    proc = run([sys.executable, "tools/eval.py", "--help"])
    assert proc.returncode == 0
    for words in ("--model", "--data", "--judge", "--run-dir", "--t-samples", "ELBO", "BLEU", "tokens/s", "objective"):
        assert words in proc.stdout, words


def test_eval_of_a_dimba_run_writes_every_field_the_plot_and_tensorboard(models, tmp_path):
    out = tmp_path / "report.json"
    proc = run([sys.executable, "tools/eval.py", "--model", str(models["dimba"]), "--data", str(models["shards"]),
                "--judge", str(models["judge"]), "--run-dir", str(models["dimba"]), "--output", str(out), *SMALL_EVAL])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "non_finite" not in report and report["complete"] is True
    sections = ["likelihood", "diagnostics", "reference"] + [f"{s}@{n}" for n in (2, 4)
                                                             for s in ("generation", "prompted", "infill", "speed")]
    sections.append("infill@best")
    assert list(report["timings_s"]) == sections
    for name, total in (("likelihood", 2), ("generation@2", 8), ("prompted@4", 16), ("infill@4", 8), ("speed@2", 2)):
        assert f"[eval] {name}: {total}/{total}" in proc.stderr, name       # a progress bar per section
    summary = proc.stdout.splitlines()
    assert summary[0].startswith("NLL bound: ") and "unigram model" in summary[0] and "context earns" in summary[0]
    assert summary[1].startswith("held-out text: unigram entropy") and "gen PPL" in summary[1]
    assert summary[2].startswith("T=2: entropy") and "the text's" in summary[2] and "prompt gain" in summary[2]
    assert "infill accuracy" in summary[3] and "most frequent token" in summary[3]
    assert summary[4].startswith("best-guess infill (one pass, each position's argmax): infill accuracy")
    for where, v in numbers(report):
        assert v is not None, f"{where} is null"
        if isinstance(v, float):
            assert math.isfinite(v), where
    assert report["model"]["objective"] == "gaussian" and report["model"]["step"] == STEP and report["warnings"] == []
    lik = report["likelihood"]
    assert lik["kind"] == "elbo_upper_bound" and lik["t_samples"] == 4 and lik["self_conditioning"] is True
    assert lik["nll_nats_per_token"] == pytest.approx(lik["reconstruction"] + lik["diffusion"] + lik["prior"])
    assert lik["ppl_bound"] == pytest.approx(math.exp(lik["nll_nats_per_token"]))
    assert lik["at_train_t_min"]["nll_nats_per_token"] >= min(r["nll_nats_per_token"] for r in lik["by_t0"])
    assert sum(b["nats_per_token"] for b in lik["diffusion_by_log_snr"]) == \
        pytest.approx(lik["by_t0"][0]["diffusion"])
    uni = report["likelihood_unigram"]
    assert uni["kind"] == "exact, no context" and uni["tokens"] >= lik["tokens"] and 0 < uni["nll_nats_per_token"] < 9
    buckets = report["denoising_by_t"]
    assert len(buckets) == 3 and buckets[0]["loss"] < buckets[-1]["loss"]     # less noise, easier denoising
    ctx = report["context_by_snr"]
    assert [r["log_snr"] for r in ctx] == [-6, -4, -3, -2, -1, 0] and ctx[0]["model_ce"] > ctx[-1]["model_ce"]
    assert all(r["bayes_ce"] is not None and r["context_gain"] == pytest.approx(r["bayes_ce"] - r["model_ce"])
               for r in ctx)
    assert [r["steps"] for r in report["generation"]] == [2, 4] == [r["steps"] for r in report["speed"]]
    for row in report["generation"]:
        assert row["samples"] == 4 and row["length"] == 64 and 0 < row["unigram_entropy_bits"] <= 12
        assert {"gen_ppl", "distinct_1", "distinct_4", "repetition_rate", "rep_adjacent"} <= set(row)
        assert row["gen_ppl"] > report["reference"]["gen_ppl"]    # a 30-step model writes worse than the books
    for row in report["prompted"]:
        assert row["prompts"] == 4 and row["prompt_len"] == 32 and 0 <= row["bleu"] <= 100
        assert math.isfinite(row["prompt_gain_nats"]) and row["continuation_tokens"] > 0      # a judge was given
        assert {"rouge1_f", "rouge2_f", "rougeL_f"} <= set(row) and row["examples"][0]["truth"]
    for row in report["infill"]:
        assert row["middle_len"] == 32 and row["prefix_len"] == row["suffix_len"] == 16
        for variant in ("with_suffix", "prefix_only"):
            assert 0 <= row[variant]["token_accuracy"] <= 1 and 0 <= row[variant]["bleu"] <= 100
    best = report["infill_best_guess"]
    assert (best["steps"], best["decoding"], best["windows"]) == (1, "greedy", 4)
    assert best["with_suffix"]["over_mode"] == pytest.approx(best["with_suffix"]["token_accuracy"]
                                                             - best["mode_baseline"])
    for row in report["speed"]:
        assert row["latency_s"] > 0 and row["tokens_per_s"] == pytest.approx(4 * 64 / row["latency_s"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(models["dimba"] / "tb"))
    acc.Reload()
    ev = acc.Scalars("eval/nll_nats_per_token")
    assert [e.step for e in ev] == [STEP] and ev[0].value == pytest.approx(lik["nll_nats_per_token"], rel=1e-6)
    assert "eval/steps4/gen_ppl" in acc.Tags()["scalars"]


def test_eval_of_the_ar_twin_reports_its_exact_perplexity(models, tmp_path):
    out = tmp_path / "ar.json"
    proc = run([sys.executable, "tools/eval.py", "--model", str(models["judge"]), "--data", str(models["shards"]),
                "--output", str(out), *SMALL_EVAL])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    lik = report["likelihood"]
    assert lik["kind"] == "exact" and lik["tokens"] == 8 * 63
    assert lik["ppl"] == pytest.approx(math.exp(lik["nll_nats_per_token"])) and lik["ppl"] < 4096
    assert "denoising_by_t" not in report and "context_by_snr" not in report and report["judge"] is None
    assert [(r["steps"], r["sampler"]) for r in report["generation"]] == [(64, "recurrent")]
    assert report["prompted"][0]["continuation_len"] == 32 and report["speed"][0]["tokens_per_s"] > 0
    assert "with_suffix" not in report["infill"][0] and report["infill"][0]["prefix_only"]["token_accuracy"] >= 0
    best = report["infill_best_guess"]
    assert (best["steps"], best["decoding"]) == (64, "greedy") and "with_suffix" not in best
    assert "best-guess infill (greedy decoding)" in proc.stdout
    assert Path(out.with_suffix(".png")).is_file()


def test_an_interrupted_eval_keeps_the_sections_it_finished(models, tmp_path):
    """The report is written after every section: stopped during generation, the likelihood is on disk."""
    from dimba.evaluation.evaluate import EvalOptions, evaluate
    from dimba.evaluation.report import write_json
    from dimba.training.export import load_model_dir
    out = tmp_path / "partial.json"

    def write_then_stop(report):
        write_json(report, out)
        if "reference" in report["timings_s"]:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        evaluate(load_model_dir(models["dimba"]), str(models["shards"]),
                 EvalOptions(batches=2, batch_size=4, t_samples=2, t_buckets=2, steps=[2], samples=2, prompts=2),
                 on_section=write_then_stop)
    report = json.loads(out.read_text())
    assert report["complete"] is False and list(report["timings_s"]) == ["likelihood", "diagnostics", "reference"]
    assert report["likelihood"]["nll_nats_per_token"] > 0 and "generation" not in report


def test_eval_sizes_follow_the_device():
    from dimba.evaluation.evaluate import CPU_SIZES, EvalOptions
    cpu, gpu = EvalOptions.for_device("cpu"), EvalOptions.for_device("cuda:1")
    assert gpu == EvalOptions() and cpu.steps == CPU_SIZES["steps"] and cpu.samples < gpu.samples
    mine = EvalOptions.for_device("cpu", steps=[4], samples=None, seed=3)
    assert mine.steps == [4] and mine.samples == CPU_SIZES["samples"] and mine.seed == 3


# ---- errors: in-process, each a one-line message and exit status 2 ----------------------------------------
def eval_main():
    spec = importlib.util.spec_from_file_location("dimba_eval_tool", ROOT / "tools" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def broken(models):
    """A converted model folder, and copies of it broken in the ways a person can break them."""
    from dimba.data.tokenizer import train_tokenizer
    from dimba.training.export import convert_checkpoint
    base = models["base"]
    good = convert_checkpoint(models["dimba"], base / "converted")
    train_tokenizer([ROOT / "data_prep" / "corpus" / "blake-poems.txt"], 512, base / "tok512")
    other_tok = base / "tok512" / "tokenizer.model"
    wrong_tok = base / "wrong-tokenizer"
    shutil.copytree(good, wrong_tok)
    shutil.copyfile(other_tok, wrong_tok / "tokenizer.model")
    other_arch = base / "other-arch"
    shutil.copytree(good, other_arch)
    cfg = json.loads((good / "config.json").read_text())
    cfg["model"]["d_model"] = 128
    (other_arch / "config.json").write_text(json.dumps(cfg))
    other_shards = shard([ROOT / "data_prep" / "corpus" / "blake-poems.txt"], base / "shards512", other_tok)
    return {"good": good, "wrong_tok": wrong_tok, "other_arch": other_arch, "other_shards": other_shards}


def error_of(capsys, *argv: str) -> str:
    code = eval_main()(SMALL_EVAL + list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("error: ")
    return err[-1]


def test_error_wrong_model_path(models, capsys, tmp_path):
    msg = error_of(capsys, "--model", str(tmp_path / "nope"), "--data", str(models["shards"]))
    assert "--model" in msg and "does not exist" in msg


def test_error_wrong_data_path(models, capsys, tmp_path):
    msg = error_of(capsys, "--model", str(models["dimba"]), "--data", str(tmp_path))
    assert "--data" in msg and "manifest.json" in msg


def test_error_model_folder_with_a_tokenizer_of_another_vocabulary(models, broken, capsys):
    msg = error_of(capsys, "--model", str(broken["wrong_tok"]), "--data", str(models["shards"]))
    assert "512 pieces" in msg and "model.vocab_size=4096" in msg


def test_error_data_tokenized_with_another_tokenizer(broken, capsys):
    msg = error_of(capsys, "--model", str(broken["good"]), "--data", str(broken["other_shards"]))
    assert "another tokenizer" in msg and "512 pieces" in msg


def test_error_weights_of_another_architecture(models, broken, capsys):
    msg = error_of(capsys, "--model", str(broken["other_arch"]), "--data", str(models["shards"]))
    assert "another architecture" in msg


def test_error_judge_that_is_not_autoregressive(models, broken, capsys):
    msg = error_of(capsys, "--model", str(models["dimba"]), "--data", str(models["shards"]),
                   "--judge", str(broken["good"]))
    assert "--judge must be an autoregressive model" in msg


def test_error_judge_wrong_path_and_model_judging_itself(models, capsys, tmp_path):
    msg = error_of(capsys, "--model", str(models["dimba"]), "--data", str(models["shards"]),
                   "--judge", str(tmp_path / "nope"))
    assert msg.startswith("error: --judge:") and "does not exist" in msg
    msg = error_of(capsys, "--model", str(models["judge"]), "--data", str(models["shards"]),
                   "--judge", str(models["judge"]))
    assert "evaluated model itself" in msg


def test_error_bad_options(models, capsys, tmp_path):
    msg = error_of(capsys, "--model", str(models["dimba"]), "--data", str(models["shards"]), "--steps", "2,5000")
    assert "diffusion.num_steps" in msg
    msg = error_of(capsys, "--model", str(models["dimba"]), "--data", str(models["shards"]),
                   "--run-dir", str(tmp_path / "nope"))
    assert "--run-dir" in msg
    msg = error_of(capsys, "--model", str(models["dimba"]), "--data", str(models["shards"]), "--sampling", "top_p=2")
    assert "sampling.top_p" in msg
    msg = error_of(capsys, "--model", str(models["dimba"]), "--data", str(models["shards"]), "--output", str(tmp_path))
    assert "--output" in msg and "is a directory" in msg
