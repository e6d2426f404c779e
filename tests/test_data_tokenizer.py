"""data_prep/train_tokenizer.py and dimba/data/tokenizer.py with real sentencepiece."""
from __future__ import annotations

import argparse
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from dimba.data.errors import DataError
from dimba.data.tokenizer import (BOS_ID, EOS_ID, MASK_ID, MASK_PIECE, PAD_ID, UNK_ID, Tokenizer, add_mask_piece,
                                  train_tokenizer)

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
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4} and info["byte_fallback"] is True
    assert info["mask_id"] == tok.mask_id == MASK_ID and info["normalizes"] is tok.normalizes is False
    assert info["sha256"] == tok.sha256 and info["trained_on"]["documents"] > 800
    assert [tok.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID)] == \
        ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    text = "Alice was beginning to get very tired of sitting by her sister."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 600 and min(ids) > MASK_ID
    assert tok.decode(ids + [EOS_ID, PAD_ID, MASK_ID]) == text                   # special ids decode to nothing
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
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.normalizes is info["normalizes"] is False and info["normalization"].startswith("identity")
    assert info["settings"]["vocab_size"] == 4096 and len(info["trained_on"]["inputs_sha256"]) == 7


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
    (["--vocab-size", "100"], "--vocab-size must be at least 261"),
    (["--vocab-size", "50000"], "could not train a 50000-piece bpe model"),
])
def test_cli_errors_are_one_line_messages(tmp_path, args, message):
    r = train_cli("--input", str(CORPUS / "blake-poems.txt"), "--output", str(tmp_path), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    r = train_cli("--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path), "--vocab-size", "300")
    assert r.returncode == 2 and f"input file {tmp_path}/nope.txt not found" in r.stderr


# ---- exact text, <mask>, old tokenizers, safe decoding -------------------------------------------------------------
def test_the_bundled_tokenizer_keeps_text_exactly():
    from dimba.data.documents import expand_inputs, iter_documents
    tok = Tokenizer(COMMITTED / "tokenizer.model")
    files = expand_inputs([str(CORPUS / "*.txt")])
    docs = list(iter_documents(files))
    assert all(tok.decode(ids) == doc for ids, doc in zip(tok.encode_batch(docs), docs))   # what the shards hold
    assert sum(doc.count("\n") for doc in docs) > 10_000
    for path in files:                                                                      # blank lines too
        text = path.read_text()
        assert tok.decode(tok.encode(text)) == text, path.name
    for text in ["a\n\nb\tc   d\n", "  def f(x):\n\treturn {'k': x}  # note\n\n    if y:\r\n        z = 1\n",
                 " leading and trailing  ", "\n", "\t\t", "", "ﬁ ² Ⅻ café (NFKC would change these)",
                 "naïve 日本 ☃ 🙂", "x<mask>y</s><pad>"]:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    assert tok.decode(tok.encode("a\u2581b")) == "a b"          # the documented exception: sentencepiece's space
    assert tok.decode(tok.encode("a\x07b\x00")) == "ab"          # and control characters (see decode)


def test_mask_is_a_control_piece_that_encode_never_produces():
    tok = Tokenizer(COMMITTED / "tokenizer.model")
    assert tok.id_to_piece(MASK_ID) == MASK_PIECE and tok.sp.is_control(MASK_ID)
    for text in ["<mask>", "a <mask> b", "<s></s><pad><unk>"]:
        assert not {PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID} & set(tok.encode(text))
    ids = tok.encode("The end.")
    assert tok.decode([MASK_ID] + ids + [MASK_ID, MASK_ID, EOS_ID, BOS_ID, PAD_ID, UNK_ID]) == "The end."


def test_decode_emits_nothing_an_input_could_not_hold():
    tok = Tokenizer(COMMITTED / "tokenizer.model")
    byte = {b: tok.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    assert all(tok.sp.is_byte(i) for i in byte.values())
    word = tok.encode("cat")                                                     # '▁cat': ' cat' after the first
    e_acute, snowman = [byte[0xC3], byte[0xA9]], [byte[0xE2], byte[0x98], byte[0x83]]
    cases = [
        (word + [byte[0x04], byte[0x07], byte[0x00], byte[0x7F]] + word, "cat cat"),  # control bytes dropped
        (e_acute + word, "é cat"),                                                   # whole characters kept
        ([byte[0xC3]] + word, "cat"),                                                # a lead byte alone
        ([byte[0xA9]] + snowman + [byte[0xE2], byte[0x98]], "☃"),                    # stray + cut continuation
        ([byte[0xED], byte[0xA0], byte[0x80]], ""),                                  # an encoded surrogate
        ([byte[0xF4], byte[0x90], byte[0x80], byte[0x80]], ""),                      # above U+10FFFF
        ([byte[0xC0], byte[0xAF]], ""),                                              # overlong
        ([byte[0x09], byte[0x0A]] + word, "\t\n cat"),                               # tab and newline stay
        (word + [UNK_ID], "cat"),                                                    # no ' ⁇ '
    ]
    for ids, want in cases:
        got = tok.decode(ids)
        assert got == want, (ids, got)
        assert "\ufffd" not in got
    rng = __import__("random").Random(0)
    for _ in range(200):                                   # random ids, as an untrained model would sample
        got = tok.decode([rng.randrange(tok.vocab_size) for _ in range(64)])
        assert "\ufffd" not in got and not any(ord(c) < 32 and c not in "\t\n\r" or 0x7F <= ord(c) < 0xA0
                                               for c in got)
    assert tok.decode(tok.encode("a\ufffdb")) == "a\ufffdb"                    # a U+FFFD in the input stays
    with pytest.raises(DataError, match="token id 4096 is out of range"):
        tok.decode([5, 4096])
    with pytest.raises(DataError, match="token id -1 is out of range"):
        tok.decode([-1])


def old_nfkc_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A tokenizer as DIMBA trained them before <mask> and exact text: sentencepiece's defaults, DIMBA's ids."""
    model = io.BytesIO()
    lines = [line for line in (CORPUS / "blake-poems.txt").read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def test_an_old_nfkc_tokenizer_loads_and_says_it_normalises(tmp_path):
    tok = Tokenizer(old_nfkc_tokenizer(tmp_path / "old.model"))
    assert tok.normalizes is True and tok.mask_id is None and tok.vocab_size == 400
    assert tok.normalization.startswith("nmt_nfkc")
    assert tok.decode(tok.encode("a\n\nb   c")) == "a b c"                      # what normalising means


def test_add_mask_piece_appends_mask_and_keeps_every_old_id(tmp_path):
    old = Tokenizer(old_nfkc_tokenizer(tmp_path / "old.model"))
    info = add_mask_piece(old.path, tmp_path / "new", command="test")
    new = Tokenizer(tmp_path / "new" / "tokenizer.model")
    assert new.mask_id == info["mask_id"] == old.vocab_size == 400 and new.vocab_size == 401
    assert new.normalizes is info["normalizes"] is True and info["derived_from"]["sha256"] == old.sha256
    assert info["sha256"] == new.sha256 and info["special_ids"]["mask"] == 400
    assert [new.id_to_piece(i) for i in range(400)] == [old.id_to_piece(i) for i in range(400)]
    text = (CORPUS / "carroll-alice.txt").read_text()[:20_000] + " <mask> naïve"
    assert new.encode(text) == old.encode(text)
    ids = old.encode("Tyger Tyger")
    assert new.decode(ids + [400]) == old.decode(ids)
    with pytest.raises(DataError, match="already has <mask> at id 400"):
        add_mask_piece(new.path, tmp_path / "again")
    (tmp_path / "in_place").mkdir()
    in_place = old_nfkc_tokenizer(tmp_path / "in_place" / "tokenizer.model")
    with pytest.raises(DataError, match="holds the source tokenizer"):
        add_mask_piece(in_place, tmp_path / "in_place")


def test_cli_add_mask(tmp_path):
    old = old_nfkc_tokenizer(tmp_path / "old.model")
    r = train_cli("--add-mask", str(old), "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "added <mask> at id 400" in r.stdout and Tokenizer(tmp_path / "out" / "tokenizer.model").mask_id == 400
    r = train_cli("--add-mask", str(tmp_path / "out" / "tokenizer.model"), "--output", str(tmp_path / "again"))
    assert r.returncode == 2 and "already has <mask>" in r.stderr and "Traceback" not in r.stderr
    r = train_cli("--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "--input and --vocab-size are required" in r.stderr


def test_cli_refuses_a_binary_input(tmp_path):
    blob = tmp_path / "photo.txt"
    blob.write_bytes(bytes(range(256)) * 64)
    r = train_cli("--input", str(CORPUS / "blake-poems.txt"), str(blob), "--vocab-size", "300",
                  "--output", str(tmp_path / "tok"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "tok").exists()
    assert f"input file {blob} is not text: " in r.stderr and "of its first 16384 bytes are not UTF-8 text" in r.stderr


def test_every_cli_option_has_a_help_line(monkeypatch):
    class Parsed(Exception):
        pass

    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    scripts = sorted((REPO / "data_prep").glob("*.py")) + sorted((REPO / "tools").glob("*.py"))
    assert {s.name for s in scripts} >= {"prepare.py", "shard.py", "train_tokenizer.py", "convert.py", "sample.py",
                                         "eval.py"}
    for script in scripts:
        with pytest.raises(Parsed) as got:
            runpy.run_path(str(script))["main"]([])
        missing = [a.option_strings for a in got.value.args[0]._actions if not a.help]
        assert not missing, f"{script.name}: options without help: {missing}"
