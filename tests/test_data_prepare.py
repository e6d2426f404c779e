"""data_prep/prepare.py and dimba/data/prepare.py: own text to a tokenizer and shards in one command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dimba.config.core import ConfigError
from dimba.config.schema import ModelConfig, load_config
from dimba.data.documents import iter_documents
from dimba.data.shards import read_manifest, read_shard
from dimba.data.tokenizer import EOS_ID, MASK_ID, Tokenizer
from dimba.training.run import open_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data_prep" / "corpus"
BUNDLED = REPO / "data_prep" / "tokenizer" / "tokenizer.model"
CLI = REPO / "data_prep" / "prepare.py"


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), "--no-progress", *args], capture_output=True, text=True,
                          timeout=120)


def one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("error: ") == 1 and text in r.stderr.strip().splitlines()[-1], r.stderr


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "my"
    r = prepare("--input", str(CORPUS / "blake-poems.txt"), str(CORPUS / "carroll-alice.txt"), "--output", str(out),
                "--vocab-size", "600", "--val-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    assert f"--set data.shards={out} --set model.vocab_size=600" in r.stdout
    return out


def test_prepare_trains_a_tokenizer_then_shards_with_a_val_split(prepared):
    info = json.loads((prepared / "tokenizer" / "tokenizer.json").read_text())
    tok = Tokenizer(prepared / "tokenizer" / "tokenizer.model")
    m = read_manifest(prepared)
    assert tok.vocab_size == info["vocab_size"] == m.vocab_size == 600 and tok.mask_id == MASK_ID
    assert (prepared / "tokenizer.model").read_bytes() == tok.path.read_bytes()       # the shards' copy
    raw = json.loads((prepared / "manifest.json").read_text())
    assert raw["totals"]["val"]["documents"] > 0 and raw["totals"]["train"]["documents"] > 0
    stored = []
    for shard in m.split("val"):
        tokens = read_shard(prepared, shard)
        stored += [tok.decode(doc) for doc in np.split(tokens, np.flatnonzero(tokens == EOS_ID) + 1)[:-1]]
    docs = set(iter_documents([CORPUS / "blake-poems.txt", CORPUS / "carroll-alice.txt"]))
    assert stored and all(doc in docs for doc in stored)                                # exact text, newlines and all


def test_a_rerun_reuses_the_tokenizer_and_the_shards(prepared):
    before = (prepared / "tokenizer" / "tokenizer.model").stat().st_mtime_ns
    r = prepare("--input", str(CORPUS / "blake-poems.txt"), str(CORPUS / "carroll-alice.txt"),
                "--output", str(prepared), "--vocab-size", "600", "--val-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    assert "reusing" in r.stderr and "nothing to do" in r.stderr
    assert (prepared / "tokenizer" / "tokenizer.model").stat().st_mtime_ns == before


def test_training_takes_vocab_size_from_the_manifest_when_unset(prepared):
    assert ModelConfig().vocab_size == 0
    cfg = load_config(str(REPO / "configs" / "tiny.json"), [f"data.shards={prepared}", "model.vocab_size=0"])
    assert open_tokenizer(cfg).vocab_size == 600 and cfg.model.vocab_size == 600
    cfg = load_config(str(REPO / "configs" / "tiny.json"), [f"data.shards={prepared}", "model.vocab_size=4096"])
    with pytest.raises(ConfigError, match="model.vocab_size is 4096 but tokenizer .* has 600 pieces"):
        open_tokenizer(cfg)
    with pytest.raises(ConfigError, match="model.vocab_size must be positive"):
        load_config(str(REPO / "configs" / "tiny.json"), ["model.vocab_size=-1"])


def test_prepare_with_a_given_tokenizer(tmp_path):
    r = prepare("--input", str(CORPUS / "blake-poems.txt"), "--output", str(tmp_path / "o"), "--tokenizer", str(BUNDLED))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "o" / "tokenizer").exists()
    assert read_manifest(tmp_path / "o").vocab_size == 4096
    assert (tmp_path / "o" / "tokenizer.model").read_bytes() == BUNDLED.read_bytes()


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    one_line_error(prepare("--input", str(tmp_path / "*.txt"), "--output", str(out)), "matched no files")
    blob = tmp_path / "scan.txt"
    blob.write_bytes(bytes(range(256)) * 40)
    one_line_error(prepare("--input", str(CORPUS / "blake-poems.txt"), str(blob), "--output", str(out)),
                   f"input file {blob} is not text: 6280 of its first 10240 bytes")
    one_line_error(prepare("--input", str(CORPUS / "blake-poems.txt"), "--output", str(out), "--tokenizer",
                           str(tmp_path / "none.model")), f"--tokenizer {tmp_path}/none.model not found")
    one_line_error(prepare("--input", str(CORPUS / "blake-poems.txt"), "--output", str(out), "--val-fraction", "1"),
                   "--val-fraction must be in [0, 1)")
    assert not out.exists()


def test_a_tokenizer_of_other_settings_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "o"
    args = ["--input", str(CORPUS / "blake-poems.txt"), "--output", str(out), "--vocab-size", "400"]
    assert prepare(*args).returncode == 0
    before = {p.name: p.read_bytes() for p in [*out.iterdir(), *(out / "tokenizer").iterdir()] if p.is_file()}
    one_line_error(prepare(*args[:-1], "500"), "holds a tokenizer trained on other inputs or settings")
    assert {p.name: p.read_bytes() for p in [*out.iterdir(), *(out / "tokenizer").iterdir()] if p.is_file()} == before
    r = prepare(*args[:-1], "500", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert Tokenizer(out / "tokenizer" / "tokenizer.model").vocab_size == read_manifest(out).vocab_size == 500
