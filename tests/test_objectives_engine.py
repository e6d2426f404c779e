"""Every engine guarantee for the masked objective and the AR twin, with the real DeepSpeed on 2 CPU ranks (the
Gaussian objective's are in test_training.py and test_tools.py): ZeRO 1/2/3, bit-exact resume after a SIGKILL
during a save, 2 ranks = 1 rank with 2 accumulation steps, the EMA, convert -> sample and eval, and the refusals
of a checkpoint, a sampler or a tokenizer that belongs to another objective."""
import json
import shutil
import subprocess
import sys

import pytest

from dimba.training.checkpoint import COMPLETE, latest_checkpoint
from tests.launch import ROOT, deepspeed_cmd, env, kill_during_a_save, losses_by_step, run
from tests.test_training import MAX_STEPS, TINY, assert_same_run, train_cmd

STAGE = {"masked": "2", "ar": "1"}          # the ZeRO stage each one's run uses (the probes below: 2 and 3)
# the masked run is a hybrid denoiser (block 1 of 2 mixes with self-attention), so that resume, convert, sample and
# eval cover the attention mixer too; the all-Mamba masked model is the probes' below
HYBRID = {"masked": ["--set", "model.attn_layer_idx=[1]"], "ar": []}


def objective_cmd(run_dir, shards, objective, *extra, ranks=2):
    return train_cmd(run_dir, shards, "--set", f"objective={objective}",
                     "--set", f"model.bidirectional={'false' if objective == 'ar' else 'true'}",
                     "--set", f"deepspeed.zero_optimization.stage={STAGE[objective]}",
                     "--set", "evaluation.sample_every=5", *HYBRID[objective], *extra, ranks=ranks)


@pytest.fixture(scope="module", params=["masked", "ar"])
def uninterrupted(request, bundled_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"uninterrupted-{request.param}")
    proc = run(objective_cmd(run_dir, bundled_shards, request.param))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return request.param, run_dir, proc.stdout


def test_run_trains_validates_and_samples(uninterrupted):
    objective, run_dir, out = uninterrupted
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1)) and losses[MAX_STEPS][0] < losses[1][0]
    assert json.loads((run_dir / "config.json").read_text())["objective"] == objective
    assert "val loss" in out and "sample:" in out
    if objective == "masked":
        assert json.loads((run_dir / "config.json").read_text())["model"]["mask_id"] == 4   # from the tokenizer
        assert "mask_frac" in out and "<mask>" not in out


def test_sigkill_during_a_save_then_resume_is_exact(uninterrupted, bundled_shards, tmp_path):
    objective, reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    cmd = objective_cmd(run_dir, bundled_shards, objective, "--set", "training.checkpoint_every=1")
    kill_during_a_save(cmd, run_dir / "checkpoints")
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is None or (latest / COMPLETE).exists()
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_run(reference, run_dir)


def test_a_checkpoint_of_another_objective_is_refused(uninterrupted, bundled_shards, tmp_path):
    objective, reference, _ = uninterrupted
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    other = "gaussian"
    proc = run(train_cmd(run_dir, bundled_shards, "--set", f"objective={other}", ranks=1))
    assert proc.returncode == 1
    assert f"was trained with objective {objective!r}, this config says {other!r}" in proc.stderr
    assert (run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / COMPLETE).exists()      # nothing lost


def tool(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def test_convert_sample_and_eval(uninterrupted, bundled_shards, tmp_path):
    objective, run_dir, _ = uninterrupted
    out = tmp_path / "model"
    proc = tool("tools/convert.py", str(run_dir), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    samplers = {"masked": ["ancestral", "confidence"], "ar": ["recurrent"]}[objective]
    for sampler in samplers:
        path = tmp_path / f"{sampler}.jsonl"
        proc = tool("tools/sample.py", "--model", str(out), "--prefix", "Alice was", "--suffix", "said the Hatter.",
                    "--middle-length", "8", "--num-samples", "2", "--steps", "4", "--sampler", sampler,
                    "--output", str(path))
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        assert all(len(r["tokens"]) == 8 and 4 not in r["tokens"] for r in rows)         # never the mask id
        assert all(r["text"].startswith("Alice was") for r in rows)
    wrong = "ddim"
    proc = tool("tools/sample.py", "--model", str(out), "--sampler", wrong)
    assert proc.returncode == 2 and f"sampler {wrong!r} does not belong to the {objective} objective" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    report = tmp_path / "eval.json"
    proc = tool("tools/eval.py", "--model", str(out), "--data", str(bundled_shards), "--output", str(report),
                "--batches", "2", "--batch-size", "4", "--t-samples", "4", "--steps", "4", "--samples", "4",
                "--prompts", "4", "--gen-batch", "4", "--speed-repeats", "1", "--examples", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    want = {"masked": "nelbo_upper_bound", "ar": "exact"}[objective]
    assert r["likelihood"]["kind"] == want and r["likelihood"]["stderr_nats"] > 0
    assert r["likelihood"]["nll_nats_per_token"] < 9.0 and r["likelihood_unigram"]["nll_nats_per_token"] > 0
    assert r["model"]["objective"] == objective and r["generation"][0]["sampler"] == samplers[0]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["masked", "ar"])
def test_two_ranks_match_one_rank_with_two_accumulation_steps(objective, tmp_path):
    """The same samples and the same masks (per-sample seeds, low-discrepancy times over the global batch), so the
    same math; only the order of fp32 additions differs."""
    out = {}
    for name, ranks, ga in [("two", 2, 1), ("one", 1, 2)]:
        proc = run(deepspeed_cmd("tests/dist/trainer_probe.py",
                                 ["--objective", objective, "--stage", "2", "--grad-accum", str(ga), "--steps", "4",
                                  "--run-dir", str(tmp_path / name), "--out", str(tmp_path / f"{name}.json")],
                                 ranks=ranks))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())["losses"]
    print("2 ranks:", out["two"], "\n1 rank: ", out["one"])
    for a, b in zip(out["two"], out["one"]):
        assert abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.parametrize("objective", ["masked", "ar"])
def test_zero3_ema_equals_a_hand_computed_ema(objective, tmp_path):
    """ZeRO-3 training, validation and text samples with the EMA swapped in, for each objective."""
    proc = run(deepspeed_cmd("tests/dist/trainer_probe.py", ["--objective", objective, "--stage", "3", "--steps", "4",
                                                             "--ema-check", "--run-dir", str(tmp_path / "r"),
                                                             "--out", str(tmp_path / "r.json")]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ema_max_abs_diff"] <= 1e-6 and r["swap_max_abs_diff"] == 0.0 and r["swap_in_max_abs_diff"] <= 1e-6
    assert r["val_loss"] == r["val_loss"] and len(r["samples"]) == 2


def test_a_tokenizer_without_a_mask_is_refused_in_one_line(tmp_path):
    """Shards of an old tokenizer (sentencepiece's defaults, no <mask> piece) given to the masked objective: one
    line naming the tokenizer and the fix, before anything is written."""
    import io
    import sentencepiece as spm
    poems = ROOT / "data_prep" / "corpus" / "blake-poems.txt"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([x for x in poems.read_text().splitlines() if x.strip()]),
                                   model_writer=model, vocab_size=400, byte_fallback=True, pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, minloglevel=2)
    old = tmp_path / "old.model"
    old.write_bytes(model.getvalue())
    shards = tmp_path / "shards"
    proc = tool("data_prep/shard.py", "--input", str(poems), "--tokenizer", str(old), "--output", str(shards),
                "--val-fraction", "0.1", "--no-progress", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    cmd = [sys.executable, "launch/train.py", "--config", "configs/tiny.json", "--run-dir", str(tmp_path / "r"),
           "--set", f"data.shards={shards}", *TINY, "--set", "objective=masked", "--set", "model.vocab_size=400"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no <mask> piece" in lines[0] and "--add-mask" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_python_api_loads_and_writes_text(uninterrupted, tmp_path):
    """The README's snippet: `from dimba import load; m = load(path); m.generate(...)`, on a run directory."""
    from dimba import load
    from dimba.config.core import ConfigError
    from dimba.training.export import ModelLoadError
    objective, run_dir, _ = uninterrupted
    m = load(run_dir, device="cpu")
    out = m.generate(["Alice was", "It was"], length=8, num_samples=2, seed=1, steps=4)
    assert [s.prompt for s in out] == ["Alice was", "Alice was", "It was", "It was"]
    assert all(len(s.tokens) == 8 and s.text.startswith(s.prompt) for s in out)
    assert [s.tokens for s in out] == [s.tokens for s in m.generate(["Alice was", "It was"], length=8,
                                                                    num_samples=2, seed=1, steps=4)]
    assert m.samplers[0] == {"masked": "ancestral", "ar": "recurrent"}[objective]
    if objective == "masked":
        framed = m.generate("The King", suffix="said the Hatter.", length=6, steps=4)[0]
        assert framed.text.startswith("The King") and framed.text.endswith("said the Hatter.")
    else:
        with pytest.raises(ConfigError, match="cannot read a suffix"):
            m.generate("The King", suffix="said the Hatter.")
    with pytest.raises(ConfigError, match="unknown sampling option"):
        m.generate("x", temprature=0.5)
    with pytest.raises(ModelLoadError, match="holds no complete checkpoint"):
        load(tmp_path)
