"""tools/convert.py and tools/sample.py on real DeepSpeed checkpoints written by 2 CPU ranks."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.dist.trainer_probe import probe_inputs
from tests.launch import ROOT, deepspeed_cmd, env, run


@pytest.fixture(scope="module", params=[1, 3], ids=["zero1", "zero3"])
def trained(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"zero{request.param}") / "run"
    proc = run(deepspeed_cmd("tests/dist/trainer_probe.py", ["--stage", str(request.param), "--steps", "3", "--save",
                                                             "--run-dir", str(run_dir), "--out", str(run_dir) + ".json"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def tool(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def test_convert_round_trip_gives_the_engine_logits(trained, tmp_path):
    from dimba.training.export import load_model_dir
    out = tmp_path / "model"
    proc = tool("tools/convert.py", str(trained), "--output", str(out), "--weights", "raw")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.model"}
    loaded = load_model_dir(out)
    x, t, clean = probe_inputs(loaded.cfg)
    with torch.no_grad():
        x0_hat = loaded.model(x, t, clean)
        logits = loaded.model.logits(x0_hat)
    engine = load_file(str(trained / "engine_outputs.safetensors"))
    # identical weights and inputs; only the order of float ops inside torch may differ between processes
    torch.testing.assert_close(x0_hat, engine["x0_hat"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, engine["logits"], rtol=1e-5, atol=1e-4)
    # the EMA export loads too and differs from the raw weights
    proc = tool("tools/convert.py", str(trained), "--output", str(tmp_path / "ema"), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    ema = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in ema.values())


def test_sample_is_reproducible_and_keeps_the_prompt(trained, tmp_path):
    outs = []
    for seed in (7, 7, 8):
        path = tmp_path / f"s{len(outs)}.jsonl"
        proc = tool("tools/sample.py", "--model", str(trained), "--prompt", "Alice was beginning to get very tired",
                    "--num-samples", "2", "--length", "12", "--steps", "4", "--seed", str(seed), "--output", str(path))
        assert proc.returncode == 0, proc.stderr
        assert "tokens/s" in proc.stderr
        outs.append([json.loads(x) for x in path.read_text().splitlines()])
    assert outs[0] == outs[1] and outs[0] != outs[2]
    for row in outs[0]:
        assert row["prefix"] == "Alice was beginning to get very tired" and len(row["tokens"]) == 12
    proc = tool("tools/sample.py", "--model", str(trained), "--prefix", "Alice was", "--suffix", "said the Hatter.",
                "--middle-length", "5", "--steps", "4", "--output", str(tmp_path / "infill.jsonl"))
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "infill.jsonl").read_text().splitlines()[0])
    assert row["prefix"] == "Alice was" and row["suffix"] == "said the Hatter." and len(row["tokens"]) == 5
    assert set(row) >= {"prefix", "middle", "suffix", "text"}


def test_tool_errors_are_one_line(trained, tmp_path):
    proc = tool("tools/sample.py", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = tool("tools/convert.py", str(tmp_path), "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "holds no complete checkpoint" in proc.stderr
    model = tmp_path / "model"
    assert tool("tools/convert.py", str(trained), "--output", str(model)).returncode == 0
    # another architecture: the config says one thing, the weights another
    other = tmp_path / "other"
    shutil.copytree(model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["d_model"] = 128
    cfg["model"]["headdim"] = 32
    (other / "config.json").write_text(json.dumps(cfg))
    proc = tool("tools/sample.py", "--model", str(other))
    assert proc.returncode == 2 and "another architecture" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # a tokenizer that does not match the model
    mismatch = tmp_path / "mismatch"
    shutil.copytree(model, mismatch)
    import sentencepiece as spm
    text = (ROOT / "data_prep" / "corpus" / "carroll-alice.txt").read_text()[:100000]
    (tmp_path / "t.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "small"), vocab_size=300,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    shutil.copyfile(tmp_path / "small.model", mismatch / "tokenizer.model")
    proc = tool("tools/sample.py", "--model", str(mismatch))
    assert proc.returncode == 2 and "has 300 pieces but the model was trained with" in proc.stderr


def one_line_error(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_broken_files_and_bad_options_are_one_line_errors(trained, tmp_path):
    """Each a one-line error with exit status 2, and nothing written or executed (tools/ and #22's probes)."""
    model = tmp_path / "model"
    assert tool("tools/convert.py", str(trained), "--output", str(model)).returncode == 0
    for args, words in ((["--length", "-5"], ["--length", "positive integer"]), (["--batch-size", "0"], ["--batch-size"]),
                        (["--top-k", "-1"], ["--top-k", ">= 0"])):
        one_line_error(tool("tools/sample.py", "--model", str(model), *args), *words)
    if not torch.cuda.is_available():
        one_line_error(tool("tools/sample.py", "--model", str(model), "--device", "cuda"), "no CUDA GPU")
    truncated = tmp_path / "truncated"
    shutil.copytree(model, truncated)
    (truncated / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])
    one_line_error(tool("tools/sample.py", "--model", str(truncated)), "model.safetensors is unreadable",
                   "convert the checkpoint again")
    (truncated / "model.safetensors").unlink()
    one_line_error(tool("tools/sample.py", "--model", str(truncated)), "has config.json but no model.safetensors")
    # checkpoints broken after their COMPLETE marker: convert refuses them, writing nothing
    for broken, words, extra in (("ema", ["ema.safetensors is unreadable", "--weights raw"], []),
                                 ("state", ["no readable state.json"], []),
                                 ("optim", ["optim_states.pt is unreadable", "earlier checkpoint"], ["--weights", "raw"]),
                                 ("pickle", ["weights-only load refuses", "was not loaded"], ["--weights", "raw"])):
        run_dir = tmp_path / f"run-{broken}"
        shutil.copytree(trained, run_dir)
        ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
        if broken == "ema":
            (ckpt / "ema.safetensors").write_bytes((ckpt / "ema.safetensors").read_bytes()[:100])
        elif broken == "state":
            (ckpt / "state.json").unlink()
        elif broken == "optim":
            f = next(ckpt.glob("*optim_states.pt"))
            f.write_bytes(f.read_bytes()[:100])
        else:
            marker = tmp_path / "executed"
            payload = (b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
                       + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")   # pickle of os.system("touch ...")
            for f in ckpt.glob("*.pt"):
                f.write_bytes(payload)
        out = tmp_path / f"out-{broken}"
        one_line_error(tool("tools/convert.py", str(run_dir), "--output", str(out), *extra), *words)
        assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "executed").exists()
