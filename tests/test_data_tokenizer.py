"""data_prep/train_tokenizer.py and dimba/data/tokenizer.py with real sentencepiece."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from dimba.data.errors import DataError
from dimba.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data_prep" / "corpus"
COMMITTED = REPO / "data_prep" / "tokenizer"
CLI = REPO / "data_prep" / "train_tokenizer.py"


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=120)


def test_cli_trains_a_tokenizer_with_dimba_ids(tmp_path):
    r = train_cli("--input", str(CORPUS / "carroll-alice.txt"), str(CORPUS / "blake-poems.txt"),
                  "--vocab-size", "600", "--output", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    tok = Tokenizer(tmp_path / "tok" / "tokenizer.model")
    assert tok.vocab_size == info["vocab_size"] == 600
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3} and info["byte_fallback"] is True
    assert info["sha256"] == tok.sha256 and info["trained_on"]["documents"] > 800
    assert [tok.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    text = "Alice was beginning to get very tired of sitting by her sister."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 600 and min(ids) > EOS_ID
    assert tok.decode(ids + [EOS_ID, PAD_ID]) == text                            # special ids decode to nothing
    assert tok.decode(tok.encode("naïve 日本")) == "naïve 日本"                     # byte fallback: nothing is lost
    assert UNK_ID not in tok.encode("日本 ☃ \u2603")


def test_training_is_deterministic_and_samples_by_hash(tmp_path):
    inputs = [CORPUS / "carroll-alice.txt", CORPUS / "blake-poems.txt"]
    a = train_tokenizer(inputs, 500, tmp_path / "a")
    train_tokenizer(inputs, 500, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    small = train_tokenizer(inputs, 500, tmp_path / "s", sample_chars=60_000)
    assert 0.25 < small["trained_on"]["sampled_fraction"] < 0.45 and a["trained_on"]["sampled_fraction"] == 1.0
    assert small["sha256"] != a["sha256"]


def test_unigram_model_type(tmp_path):
    info = train_tokenizer([CORPUS / "blake-poems.txt"], 400, tmp_path, model_type="unigram")
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert info["model_type"] == "unigram" and tok.vocab_size == 400 and tok.eos_id == EOS_ID
    assert tok.decode(tok.encode("Tyger Tyger, burning bright")) == "Tyger Tyger, burning bright"


def test_committed_tokenizer_matches_its_description():
    info = json.loads((COMMITTED / "tokenizer.json").read_text())
    tok = Tokenizer(COMMITTED / "tokenizer.model")
    assert tok.sha256 == info["sha256"] and tok.vocab_size == info["vocab_size"] == 4096
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)


def test_a_model_with_other_special_ids_is_refused(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter((CORPUS / "blake-poems.txt").read_text().splitlines()),
                                   model_writer=model, vocab_size=300, minloglevel=2)   # defaults: unk=0, bos=1, eos=2
    (tmp_path / "other.model").write_bytes(model.getvalue())
    with pytest.raises(DataError, match=r"has special ids .* but DIMBA needs .*retrain it"):
        Tokenizer(tmp_path / "other.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(DataError, match="not found"):
        Tokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize("args, message", [
    (["--vocab-size", "100"], "--vocab-size must be at least 260"),
    (["--vocab-size", "50000"], "could not train a 50000-piece bpe model"),
])
def test_cli_errors_are_one_line_messages(tmp_path, args, message):
    r = train_cli("--input", str(CORPUS / "blake-poems.txt"), "--output", str(tmp_path), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    r = train_cli("--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path), "--vocab-size", "300")
    assert r.returncode == 2 and f"input file {tmp_path}/nope.txt not found" in r.stderr
