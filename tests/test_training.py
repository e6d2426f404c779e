"""The training engine with the real DeepSpeed on CPU ranks (gloo): equivalence, EMA, exact resume, errors."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimba.training.checkpoint import COMPLETE, complete_checkpoints, latest_checkpoint
from dimba.training.distributed import free_port
from tests.launch import ROOT, deepspeed_cmd, env, kill_during_a_save, losses_by_step, run

TINY = ["--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.d_embed=16",
        "--set", "model.d_state=16", "--set", "model.headdim=16", "--set", "model.chunk_size=32",
        "--set", "data.seq_len=64", "--set", "deepspeed.train_micro_batch_size_per_gpu=4",
        "--set", "deepspeed.zero_optimization.stage=2", "--set", "training.warmup_steps=2",
        "--set", "evaluation.val_every=5", "--set", "evaluation.val_batches=2", "--set", "evaluation.sample_every=0",
        "--set", "logging.log_every=1", "--set", "data.num_workers=1",
        "--set", "diffusion.time_warp=learned",   # stateful: exact resume must restore it (power warp for 2 steps)
        "--set", "objective=gaussian"]            # this file: the Gaussian objective's engine guarantees
MAX_STEPS = 10


def train_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tiny.json", "--run-dir", str(run_dir), "--set", f"data.shards={shards}",
            "--set", f"training.max_steps={MAX_STEPS}", "--set", "training.checkpoint_every=2",
            "--set", "training.keep_last=2", *TINY, *extra]


def train_cmd(run_dir: Path, shards: Path, *extra: str, ranks: int = 2) -> list[str]:
    return deepspeed_cmd("launch/train.py", train_args(run_dir, shards, *extra), ranks=ranks)


def final_weights(run_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses_by_step(a), losses_by_step(b)
    assert sorted(la) == sorted(lb) == list(range(1, MAX_STEPS + 1))
    for step in la:   # a step re-run after a kill logs again: every logged value must equal the uninterrupted one
        assert all(v == la[step][0] for v in lb[step]), f"step {step}: {la[step]} vs {lb[step]}"
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weights differ in {k}"
    from safetensors.torch import load_file
    ea = load_file(str(latest_checkpoint(a / "checkpoints") / "ema.safetensors"))
    eb = load_file(str(latest_checkpoint(b / "checkpoints") / "ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.fixture(scope="module")
def uninterrupted(bundled_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = run(train_cmd(run_dir, bundled_shards))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_run_finishes_checkpoints_and_keeps_the_last_k(uninterrupted):
    status = json.loads((uninterrupted / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == MAX_STEPS
    kept = [p.name for p in complete_checkpoints(uninterrupted / "checkpoints")]
    assert kept == ["step-00000008", "step-00000010"]
    assert (uninterrupted / "checkpoints" / "latest").read_text() == "step-00000010"
    assert json.loads((uninterrupted / "config.json").read_text())["training"]["max_steps"] == MAX_STEPS
    assert list((uninterrupted / "tb").glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in rows) and any("grad_norm" in r for r in rows)
    warp = json.loads((uninterrupted / "time_warp.json").read_text())
    assert warp["active"] and warp["steps"] == MAX_STEPS and len(warp["ce_curve"]) == len(warp["density"]) == 64
    assert any("time_warp/t_median" in r for r in rows)
    first, last = losses_by_step(uninterrupted)[1][0], losses_by_step(uninterrupted)[MAX_STEPS][0]
    assert last < first


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    import psutil
    return [c.pid for c in psutil.Process(launcher.pid).children(recursive=True)]


def test_resume_after_sigusr1_is_exact(uninterrupted, bundled_shards, tmp_path):
    run_dir = tmp_path / "run"
    _signal_ranks_at(train_cmd(run_dir, bundled_shards), "[dimba] step 3 ")   # pre-empt once step 3 is logged
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and 3 <= status["step"] < MAX_STEPS
    # the resumed run gets a second stop signal as its last step is logged: that step is saved anyway, so the
    # run finishes (state 'finished', exit 0) instead of stopping with nothing left to resume
    out = _signal_ranks_at(train_cmd(run_dir, bundled_shards), f"[dimba] step {MAX_STEPS} ")
    assert "resumed from" in out and "stopping at step" not in out, out[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert_same_run(uninterrupted, run_dir)


def _signal_ranks_at(cmd: list[str], marker: str) -> str:
    """Run cmd, SIGUSR1 every rank when a line holds marker; returns the output; asserts exit code 0."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            for pid in _rank_pids(proc):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
    assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
    return "".join(lines)


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(uninterrupted, bundled_shards, tmp_path):
    """SIGUSR1 reaches rank 0 alone, after the ranks agreed on the stop flag for step 3 but before they decide to
    save: rank 0 must not save or stop on its own (a lone save is a collective the other rank never joins: a hang).
    Both ranks take it up at the next agreement, save step 4 together and stop; the resumed run is exact."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(run_dir, bundled_shards)
    cmd[cmd.index(str(ROOT / "launch" / "train.py"))] = str(ROOT / "tests" / "stop_one_rank.py")
    proc = run(cmd, timeout=240, extra_env={"DIMBA_TEST_STOP_AT": "3"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step 4 on SIGUSR1" in out, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 4
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-00000004"
    proc = run(train_cmd(run_dir, bundled_shards))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert_same_run(uninterrupted, run_dir)


def test_a_stop_signal_after_the_run_ended_is_ignored():
    """Interpreter shutdown puts back the fatal default action of Python-handled signals; once released, the
    stop flag leaves SIGUSR1/SIGTERM ignored, so a time-limit warning landing as a finished run exits is harmless."""
    code = ("import os, signal, time\n"
            "from dimba.training.stopflag import StopFlag\n"
            "stop = StopFlag(); stop.install(); stop.release()\n"
            "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
            "print('requested', stop.requested)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "requested False", proc.stdout + proc.stderr


def test_sigkill_during_a_save_then_resume_is_exact(uninterrupted, bundled_shards, tmp_path):
    """SIGKILL every process the moment a checkpoint folder exists without COMPLETE (mid-save); if no save is
    caught in the act, at a random moment instead. The resumed run must end bit-identical."""
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    kill_during_a_save(train_cmd(run_dir, bundled_shards, "--set", "training.checkpoint_every=1"), ckpt_dir)
    latest = latest_checkpoint(ckpt_dir)
    assert latest is None or (latest / COMPLETE).exists()
    proc = run(train_cmd(run_dir, bundled_shards, "--set", "training.checkpoint_every=1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_run(uninterrupted, run_dir)


def test_posterior_head_trains_under_zero3_from_the_unigram_prior(bundled_shards, tmp_path):
    """x0_head 'posterior' (extra bare parameters on the top module) under ZeRO-3 on 2 ranks; its prior starts at
    the train split's unigram log-probabilities, so after 10 Adam steps of lr <= 2e-3 it is still within 0.05.
    The launch leaves no DeepSpeed shared-memory file behind."""
    from dimba.data.shards import unigram_log_probs
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc = run(train_cmd(tmp_path / "r", bundled_shards, "--set", "model.x0_head=posterior",
                         "--set", "deepspeed.zero_optimization.stage=3"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (67 MB of RAM per rank) are unlinked, not left in /dev/shm
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    losses = losses_by_step(tmp_path / "r")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    prior = final_weights(tmp_path / "r")["prior"].double()
    unigram = torch.from_numpy(unigram_log_probs(bundled_shards, 4096, 0)).clamp_min(-30.0)
    assert (prior - unigram).abs().max() < 0.05
    assert unigram.max() - unigram[1:].min() > 8            # a prior a zero-initialised bias could not reach


def test_zero2_on_two_ranks_matches_one_rank_with_the_same_global_batch(tmp_path):
    """2 ranks x micro-batch 4 vs 1 rank x 2 micro-batches of 4: the same samples and noise, so the same math;
    only the order of fp32 additions differs (all-reduce vs accumulation), hence rel. tolerance 1e-5."""
    out = {}
    for name, ranks, ga in [("two", 2, 1), ("one", 1, 2)]:
        proc = run(deepspeed_cmd("tests/dist/trainer_probe.py", ["--stage", "2", "--grad-accum", str(ga), "--steps", "5",
                                                                 "--run-dir", str(tmp_path / name),
                                                                 "--out", str(tmp_path / f"{name}.json")], ranks=ranks))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    two, one = out["two"]["losses"], out["one"]["losses"]
    print("2 ranks:", two, "\n1 rank: ", one)
    assert len(two) == len(one) == 5
    for a, b in zip(two, one):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert two[-1] < two[0]


def _reshard_leg(run_dir: Path, shards: Path, stage: int, ranks: int, accumulation: int, steps: int):
    return run(train_cmd(run_dir, shards, "--set", f"training.max_steps={steps}", "--set", "training.decay=constant",
                         "--set", f"deepspeed.zero_optimization.stage={stage}",
                         "--set", f"deepspeed.gradient_accumulation_steps={accumulation}", ranks=ranks))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_resume_on_another_number_of_ranks_continues_the_same_run(bundled_shards, tmp_path, stage):
    """2 ranks -> 1 rank x 2 accumulation steps -> 2 ranks: DeepSpeed's universal checkpoint reshards the optimizer
    state and the data order depends on the global batch only, so every step's loss, the final weights, the EMA
    and the learned time warp equal the uninterrupted 2-rank run's within fp32 summation-order tolerance (constant
    lr: the legs' max_steps differ). Another global batch is refused in one line and changes nothing.

    ZeRO-3: DeepSpeed's stage-3 accumulation already makes 1 rank x 2 micro-batches differ from 2 ranks from the
    second step of a fresh run on (measured: step 2 loss 8.3970 vs 8.3924), so there the steps up to the first one
    after resharding (what the resharded weights give) must be equal, and the run must go on to the end."""
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    for run_dir, ranks, accumulation, steps in [(ref, 2, 1, 6), (moved, 2, 1, 2), (moved, 1, 2, 4), (moved, 2, 1, 6)]:
        proc = _reshard_leg(run_dir, bundled_shards, stage, ranks, accumulation, steps)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if ranks == 1:
            assert "was written by 2 ranks: resharding it for 1" in proc.stdout
            before = {p: p.read_bytes() for p in sorted(moved.rglob("*")) if p.is_file()}
            refused = run([sys.executable, "launch/train.py",
                           *train_args(moved, bundled_shards, "--set", "training.max_steps=6")])
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode == 1 and len(lines) == 1, refused.stderr[-3000:]
            assert "global batch of 8 (1 ranks x micro-batch 4 x 2 accumulation steps), this run's is 4" in lines[0]
            assert "deepspeed.gradient_accumulation_steps=2" in lines[0]
            assert {p: p.read_bytes() for p in sorted(moved.rglob("*")) if p.is_file()} == before
    la, lb = losses_by_step(ref), losses_by_step(moved)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    for step in la if stage < 3 else (1, 2, 3):
        assert abs(la[step][0] - lb[step][-1]) <= 1e-5 * abs(la[step][0]), (step, la[step], lb[step])
    if stage == 3:
        return
    wa, wb = final_weights(ref), final_weights(moved)
    assert wa.keys() == wb.keys() and all(_close(wa[k], wb[k]) for k in wa)
    from safetensors.torch import load_file
    ea, eb = (load_file(str(latest_checkpoint(d / "checkpoints") / "ema.safetensors")) for d in (ref, moved))
    assert all(_close(ea[k], eb[k]) for k in ea)
    sa, sb = (json.loads((latest_checkpoint(d / "checkpoints") / "state.json").read_text()) for d in (ref, moved))
    assert sa["tokens_seen"] == sb["tokens_seen"] and sa["micro_index"] == sb["micro_index"]
    wa_, wb_ = sa["objective_state"], sb["objective_state"]           # the learned time warp's statistics
    assert wa_["steps"] == wb_["steps"] == 6 and wa_["count"] == wb_["count"]
    assert _close(torch.tensor(wa_["ce_sum"]), torch.tensor(wb_["ce_sum"]))


def test_zero3_ema_equals_a_hand_computed_ema(tmp_path):
    proc = run(deepspeed_cmd("tests/dist/trainer_probe.py", ["--stage", "3", "--steps", "5", "--ema-check",
                                                             "--run-dir", str(tmp_path / "r"), "--out", str(tmp_path / "r.json")]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ema_max_abs_diff"] <= 1e-6            # same fp32 arithmetic; allow for partition layout only
    assert r["swap_max_abs_diff"] == 0.0            # validation/sampling with the EMA leaves training weights intact
    assert r["swap_in_max_abs_diff"] <= 1e-6        # and it really evaluated the EMA
    assert r["val_loss"] == r["val_loss"] and len(r["samples"]) == 2


def test_incomplete_checkpoint_is_never_resumed_from(tmp_path):
    ck = tmp_path / "checkpoints"
    for name, complete in [("step-00000002", True), ("step-00000004", True), ("step-00000006", False)]:
        (ck / name).mkdir(parents=True)
        if complete:
            (ck / name / COMPLETE).write_text("")
    (ck / "latest").write_text("step-00000006")          # a crash between writing latest and COMPLETE cannot happen,
    assert latest_checkpoint(ck).name == "step-00000004"  # but even a wrong `latest` is not trusted
    (ck / "latest").write_text("step-00000002")
    assert latest_checkpoint(ck).name == "step-00000004"


def test_checkpoint_of_another_model_is_refused(uninterrupted, bundled_shards, tmp_path):
    import shutil
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    proc = run(train_cmd(run_dir, bundled_shards, "--set", "model.d_model=128", "--set", "model.headdim=32", ranks=1))
    assert proc.returncode == 1
    assert "was written by a different model (model.d_model differs)" in proc.stderr
    assert (run_dir / "checkpoints" / "step-00000010" / COMPLETE).exists()     # nothing lost


def test_non_finite_losses_stop_the_run_after_saving(bundled_shards, tmp_path):
    proc = run(train_cmd(tmp_path / "r", bundled_shards, "--set", "training.lr=1e9", "--set", "training.warmup_steps=0",
                         "--set", "training.max_nonfinite=2", ranks=1))
    assert proc.returncode == 1
    assert "consecutive non-finite losses" in proc.stderr
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "failed"
    assert latest_checkpoint(tmp_path / "r" / "checkpoints") is not None


@pytest.mark.parametrize("override,message", [
    ("data.shards=/nonexistent/shards", "data.shards: /nonexistent/shards has no manifest.json"),
    ("model.vocab_size=1000", "model.vocab_size is 1000 but tokenizer"),
    ("training.max_step=3", "unknown config key 'training.max_step'"),
    ("training.lr=-1", "training.lr must be > 0"),
])
def test_bad_inputs_give_one_line_errors(bundled_shards, tmp_path, override, message):
    cmd = [sys.executable, "launch/train.py", "--config", "configs/tiny.json", "--run-dir", str(tmp_path / "r"),
           "--set", f"data.shards={bundled_shards}", "--set", override]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_runs_under_torchrun(bundled_shards, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "launch/train.py",
           "--config", "configs/tiny.json", "--run-dir", str(tmp_path / "r"), "--set", f"data.shards={bundled_shards}",
           "--set", "training.max_steps=3", *TINY]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "finished"
    assert "world size 2" in proc.stdout
