"""Errors and signals end every process of a run (ranks, loader workers, launcher) within a bound, status.json
tells what happened, and a restart with another tokenizer is refused without touching the run directory.

Real launches (DeepSpeed's launcher on 2 CPU ranks, plain python) with a real loader worker (data.num_workers=1).
Every process a probe starts carries DIMBA_TEST_TAG in its environment; a probe ends when none is left."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from dimba.training.checkpoint import latest_checkpoint
from dimba.training.distributed import free_port
from dimba.training.status import STALE_MIN_S, read_status, record_failure, write_status
from tests.launch import ROOT, deepspeed_cmd, env, run
from tests.test_training import TINY

BOUND_S = 60          # from the fault (or signal) to the last process gone; measured figures are printed


def train_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tiny.json", "--run-dir", str(run_dir), "--set", f"data.shards={shards}",
            "--set", "training.max_steps=200", "--set", "training.checkpoint_every=2", *TINY, *extra]


def tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment holds DIMBA_TEST_TAG=tag (any session, orphans included)."""
    needle = f"DIMBA_TEST_TAG={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0") and \
                        (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(d.name))
            except OSError:
                pass
    return found


class Probe:
    """One launch: its output lines as they come (read by a thread), and the moment every process it started is
    gone."""

    def __init__(self, cmd: list[str], **extra_env: str):
        self.tag = uuid.uuid4().hex
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **extra_env, "DIMBA_TEST_TAG": self.tag},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, marker: str, timeout: float = 240) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if any(marker in line for line in list(self.lines)):
                return time.time()
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"no line with {marker!r}:\n{self.output[-3000:]}")

    def end(self, since: float, bound: float = BOUND_S) -> float:
        """Seconds from `since` until no process of the launch is left (asserting it is under `bound`)."""
        while (self.proc.poll() is None or tagged(self.tag)) and time.time() - since < bound:
            time.sleep(0.1)
        took = time.time() - since
        left = tagged(self.tag)
        if self.proc.poll() is None or left:
            self.kill()
            raise AssertionError(f"processes {left} still running {took:.0f} s after the fault:\n{self.output[-3000:]}")
        time.sleep(0.2)                                    # the reader thread takes the last lines
        return took

    def kill(self) -> None:
        for pid in tagged(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def output(self) -> str:
        return "".join(self.lines)


def launcher_cmd(launcher: str, args: list[str]) -> list[str]:
    if launcher == "deepspeed":
        return deepspeed_cmd("launch/train.py", args)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "launch/train.py", *args]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_full_disk_on_rank_0_mid_save_ends_every_rank(launcher, bundled_shards, tmp_path):
    """Rank 0 cannot write state.json (ENOSPC) while rank 1 waits at the save's barrier: rank 0 prints its one
    line and exits, rank 1 sees the broken connection and exits, the launcher returns non-zero."""
    run_dir = tmp_path / "r"
    probe = Probe(launcher_cmd(launcher, train_args(run_dir, bundled_shards)), DIMBA_TEST_ENOSPC="state.json")
    t0 = probe.wait_for("[dimba] step 2 loss")
    took = probe.end(t0)
    print(f"full disk under {launcher}: every process gone {took:.1f} s after step 2 was logged")
    assert probe.proc.returncode != 0
    errors = [line for line in probe.lines if line.startswith("error: rank")]
    assert "error: rank 0: OSError: [Errno 28] No space left on device" in errors[0], probe.output[-3000:]
    assert errors[1].startswith("error: rank 1: RuntimeError: another rank ended first") and len(errors) == 2, errors
    assert not [line for line in probe.lines if "/dimba/" in line and "File" in line], probe.output[-3000:]  # no trace
    status = read_status(run_dir)
    assert status["state"] == "failed" and "No space left on device" in status["message"], status
    assert latest_checkpoint(run_dir / "checkpoints") is None


@pytest.mark.slow
def test_a_stuck_rank_is_timed_out(bundled_shards, tmp_path):
    """Rank 1 stops answering (SIGSTOP: alive, holding its sockets open): rank 0 gives up on the next collective
    after DIMBA_COLLECTIVE_TIMEOUT_S and exits, and DeepSpeed's launcher ends rank 1 (SIGKILL, 30 s after its
    SIGTERM, which a stopped process cannot act on)."""
    import psutil
    run_dir = tmp_path / "r"
    probe = Probe(deepspeed_cmd("launch/train.py", train_args(run_dir, bundled_shards)), DIMBA_COLLECTIVE_TIMEOUT_S="5")
    probe.wait_for("[dimba] step 3 loss")
    ranks = [r for launch in psutil.Process(probe.proc.pid).children() for r in launch.children()]
    os.kill(next(r.pid for r in ranks if "--local_rank=1" in r.cmdline()), signal.SIGSTOP)
    t0 = time.time()
    took = probe.end(t0, bound=BOUND_S + 30)
    print(f"stuck rank: every process gone {took:.1f} s after SIGSTOP")
    assert probe.proc.returncode != 0
    errors = [line for line in probe.lines if line.startswith("error: rank")]
    assert errors and errors[0].startswith("error: rank 0: RuntimeError: another rank did not join a collective "
                                           "within 5 s"), probe.output[-3000:]
    assert read_status(run_dir)["state"] == "failed"


def test_a_truncated_val_shard_ends_a_plain_python_run(bundled_shards, tmp_path):
    """The only val shard is truncated: the first validation raises in the loader worker. Before, the process then
    hung at interpreter exit, joining the worker (which ignores SIGTERM) forever."""
    shards = tmp_path / "shards"
    shutil.copytree(bundled_shards, shards)
    val = shards / "val-000000.tar"
    val.write_bytes(val.read_bytes()[:1000])
    run_dir = tmp_path / "r"
    probe = Probe([sys.executable, "launch/train.py", *train_args(run_dir, shards)])
    t0 = probe.wait_for("[dimba] step 5 loss")
    took = probe.end(t0)
    print(f"truncated val shard: every process gone {took:.1f} s after step 5 was logged")
    assert probe.proc.returncode == 1
    errors = [line for line in probe.lines if line.startswith("error:")]
    assert len(errors) == 1 and "val shards" in errors[0] and "unreadable" in errors[0], probe.output[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "failed" and "unreadable" in status["message"] and status["step"] == 5


@pytest.mark.parametrize("launcher", ["deepspeed", "python"])
def test_ctrl_c_stops_saves_and_ends_every_process(launcher, bundled_shards, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, under DeepSpeed's own launcher (which SIGTERMs
    the ranks too: the same stop) and in a plain python process: the ranks finish the step and save, the loader
    workers ignore it, every process ends; plain python exits 130."""
    run_dir = tmp_path / "r"
    args = train_args(run_dir, bundled_shards)
    probe = Probe(deepspeed_cmd("launch/train.py", args) if launcher == "deepspeed"
                  else [sys.executable, "launch/train.py", *args])
    t0 = probe.wait_for("[dimba] step 3 loss")
    os.killpg(probe.proc.pid, signal.SIGINT)
    took = probe.end(t0)
    print(f"Ctrl-C under {launcher}: every process gone {took:.1f} s after SIGINT")
    assert probe.proc.returncode != 0, probe.output[-3000:]            # DeepSpeed's runner: KeyboardInterrupt
    assert launcher != "python" or probe.proc.returncode == 130, probe.output[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "interrupted" and status["message"] == "stopped by SIGINT", status
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step-{status['step']:08d}"


def test_sigterm_to_the_launcher_reaches_the_ranks(bundled_shards, tmp_path):
    """`python launch/train.py --ranks 2` runs DeepSpeed's launcher and passes SIGTERM on to the ranks: they save
    and stop, and the command exits 143 (interrupted), not 0. While it runs, status.json has a live heartbeat.
    Nothing a user cannot act on reaches the console (dimba/console.py)."""
    run_dir = tmp_path / "r"
    probe = Probe([sys.executable, "launch/train.py", "--ranks", "2", *train_args(run_dir, bundled_shards)])
    probe.wait_for("[dimba] step 3 loss")
    deadline = time.time() + 10
    while (status := read_status(run_dir)).get("step", 0) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert status["state"] == "running" and not status["stale"], status
    assert status["loss"] > 0 and status["eta_s"] > 0 and status["last_checkpoint"] == 2, status
    t0 = time.time()
    os.kill(probe.proc.pid, signal.SIGTERM)
    took = probe.end(t0)
    print(f"SIGTERM to the launcher: every process gone {took:.1f} s after the signal")
    assert probe.proc.returncode == 128 + signal.SIGTERM, probe.output[-3000:]
    for noise in ("Setting accelerator", "built successfully", "Warning", "[INFO]", "CUDA_VISIBLE_DEVICES"):
        assert noise not in probe.output, (noise, probe.output[-3000:])
    status = read_status(run_dir)
    assert status["state"] == "interrupted" and status["message"] == "stopped by SIGTERM", status
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step-{status['step']:08d}"


def test_data_too_small_for_the_ranks_is_one_line_before_anything_starts(bundled_shards, tmp_path):
    """seq_len so long that the train split cannot give each of 2 ranks one batch: refused by every rank before the
    process group exists, printed once (rank 0), exit 2, and the run directory is never made."""
    run_dir = tmp_path / "r"
    proc = run(deepspeed_cmd("launch/train.py", train_args(run_dir, bundled_shards, "--set", "data.seq_len=100000")))
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fewer than one batch per lane: 2 lanes" in errors[0] and "Traceback" not in proc.stderr
    assert "exits with return code" not in proc.stdout + proc.stderr      # the launcher adds no line of its own
    assert not run_dir.exists()


def _hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_restart_with_another_tokenizer_is_refused_and_changes_nothing(bundled_shards, tmp_path):
    """Another 4096-piece tokenizer (one piece's score changed: same size, other sha256) is refused against the
    shards' manifest, and, with shards of its own, against the run directory; a restart on another global batch is
    refused too. Each names both files in one line, and the run directory stays byte-identical. tools/convert.py
    refuses a run whose tokenizer.model was swapped for it."""
    import sentencepiece.sentencepiece_model_pb2 as pb
    bundled_tok = ROOT / "data_prep" / "tokenizer" / "tokenizer.model"
    proto = pb.ModelProto()
    proto.ParseFromString(bundled_tok.read_bytes())
    proto.pieces[-1].score -= 1.0
    other = tmp_path / "other" / "tokenizer.model"
    other.parent.mkdir()
    other.write_bytes(proto.SerializeToString())
    other_shards = tmp_path / "other_shards"
    subprocess.run([sys.executable, "data_prep/shard.py", "--input", str(ROOT / "data_prep" / "corpus" / "*.txt"),
                    "--tokenizer", str(other), "--output", str(other_shards), "--val-fraction", "0.05",
                    "--shard-tokens", "100000", "--no-progress"], check=True, capture_output=True, cwd=ROOT)
    run_dir = tmp_path / "r"
    base = [sys.executable, "launch/train.py", "--config", "configs/tiny.json", "--run-dir", str(run_dir),
            "--set", "training.max_steps=2", *TINY, "--set", "evaluation.val_every=0", "--set", "data.num_workers=0"]
    proc = subprocess.run(base + ["--set", f"data.shards={bundled_shards}"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _hashes(run_dir)
    assert "tokenizer.model" in before and "config.json" in before and "status.json" in before
    cases = [  # (overrides, extra env, exit code, what the one line must name)
        ([f"data.shards={bundled_shards}", f"data.tokenizer={other}"], {}, 2,
         [str(other), str(bundled_shards / "tokenizer.model")]),
        ([f"data.shards={other_shards}"], {}, 1,
         [str(run_dir / "tokenizer.model"), str(other_shards / "tokenizer.model")]),
        ([f"data.shards={bundled_shards}"], {"RANK": "0", "WORLD_SIZE": "2"}, 1,
         ["global batch of 4 (1 ranks x micro-batch 4 x 1 accumulation steps), this run's is 8 (2 x 4 x 1)",
          "resume on a number of ranks that divides 1"]),
    ]
    for overrides, extra_env, code, names in cases:
        cmd = base + [a for o in overrides for a in ("--set", o)] + ["--set", "training.max_steps=4"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **extra_env}, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1, proc.stderr[-3000:]
        assert all(n in lines[0] for n in names), lines[0]
        assert _hashes(run_dir) == before, overrides
    # convert (and eval, through the same loader) checks the run's tokenizer against its checkpoint's record
    copy = tmp_path / "swapped"
    shutil.copytree(run_dir, copy)
    shutil.copyfile(other, copy / "tokenizer.model")
    proc = subprocess.run([sys.executable, "tools/convert.py", str(copy), "--output", str(tmp_path / "m")], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert str(copy / "tokenizer.model") in lines[0] and "state.json" in lines[0], lines[0]


def test_a_heartbeat_older_than_its_intervals_is_stale(tmp_path):
    assert read_status(tmp_path) == {"state": "none", "stale": False}
    write_status(tmp_path, "running", step=3, log_interval_s=100.0)
    beat = read_status(tmp_path)["heartbeat"]
    assert not read_status(tmp_path, now=beat + 999)["stale"]              # 10 intervals of 100 s
    assert read_status(tmp_path, now=beat + 1001)["stale"]
    write_status(tmp_path, "running", step=3, log_interval_s=0.5)
    beat = read_status(tmp_path)["heartbeat"]
    assert not read_status(tmp_path, now=beat + STALE_MIN_S - 1)["stale"]  # short intervals: the floor holds
    assert read_status(tmp_path, now=beat + STALE_MIN_S + 1)["stale"]
    write_status(tmp_path, "finished", step=3)
    assert not read_status(tmp_path, now=time.time() + 10 ** 6)["stale"]   # only a running run can be dead
    with pytest.raises(ValueError):
        write_status(tmp_path, "done")
    json.loads((tmp_path / "status.json").read_text())


def test_the_first_failure_of_a_run_is_the_one_recorded(tmp_path):
    write_status(tmp_path, "failed", step=7, message="rank 0: an earlier incarnation's failure")
    since = time.time() + 0.01
    time.sleep(0.02)
    record_failure(tmp_path, "rank 1: DataError: the cause", since)           # an old failure is overwritten
    assert read_status(tmp_path)["message"] == "rank 1: DataError: the cause" and "step" not in read_status(tmp_path)
    record_failure(tmp_path, "rank 0: RuntimeError: another rank ended first", since)   # the echo is not
    assert read_status(tmp_path)["message"] == "rank 1: DataError: the cause"
    write_status(tmp_path, "running", step=12, loss=3.5)
    record_failure(tmp_path, "rank 0: OSError: full", since)                   # this run's heartbeat is kept
    status = read_status(tmp_path)
    assert status["state"] == "failed" and status["step"] == 12 and status["loss"] == 3.5
