"""data_prep/shard.py and dimba/data/sharding.py on real text, real sentencepiece, real tars and real subprocesses."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from dimba.data.documents import InputStats, expand_inputs, iter_documents
from dimba.data.errors import DataError
from dimba.data.shards import ShardWriter, read_manifest, read_shard, token_dtype
from dimba.data.sharding import ShardJob, run_shard_job, split_fraction
from dimba.data.tokenizer import EOS_ID

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data_prep" / "tokenizer" / "tokenizer.model"
CORPUS = REPO / "data_prep" / "corpus"
SHARD_CLI = REPO / "data_prep" / "shard.py"
SMALL = ["carroll-alice.txt", "blake-poems.txt", "shakespeare-hamlet.txt"]   # about 90k tokens


def shard(inputs, out, **kw) -> dict:
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda msg: None)
    return run_shard_job(ShardJob(inputs=[str(p) for p in inputs], tokenizer=str(TOKENIZER), output=str(out), **kw))


def shard_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SHARD_CLI), "--no-progress", *args], capture_output=True, text=True,
                          timeout=timeout)


def tar_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))}


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    """A stored token stream back into documents (each ends with EOS)."""
    ends = np.flatnonzero(tokens == EOS_ID)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1, "a shard must end with EOS"
    return [d.tolist() for d in np.split(tokens, ends + 1)[:-1]] if len(tokens) else []


def stored_docs(directory: Path, split: str) -> list[list[int]]:
    m = read_manifest(directory)
    return [doc for info in m.split(split) for doc in split_docs(read_shard(directory, info))]


@pytest.fixture(scope="module")
def small_inputs():
    return [CORPUS / name for name in SMALL]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_inputs):
    out = tmp_path_factory.mktemp("ref")
    manifest = shard(small_inputs, out, val_fraction=0.1, shard_tokens=8000, workers=2)
    return out, manifest


def test_round_trip_gives_sentencepiece_tokens_of_every_document(reference, small_inputs):
    out, manifest = reference
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    docs = list(iter_documents(small_inputs))
    expected = {"train": [], "val": []}
    for doc in docs:
        expected["val" if split_fraction(doc) < 0.1 else "train"].append(sp.encode(doc) + [EOS_ID])
    assert expected["val"] and expected["train"]
    for split in ("train", "val"):
        assert stored_docs(out, split) == expected[split]
        assert manifest["totals"][split]["documents"] == len(expected[split])
        assert manifest["totals"][split]["tokens"] == sum(map(len, expected[split]))
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == sp.vocab_size()
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    sizes = [s["tokens"] for s in manifest["shards"] if s["split"] == "train"]
    assert len(sizes) >= 8 and all(8000 <= n < 8000 + 2000 for n in sizes[:-1])   # whole paragraphs, ~8000 each


def test_shards_are_plain_webdataset(reference):
    import webdataset as wds
    out, manifest = reference
    names = [str(out / s["name"]) for s in manifest["shards"] if s["split"] == "train"]
    samples = list(wds.WebDataset(names, shardshuffle=False, empty_check=False))
    assert all(set(s) >= {"__key__", "tokens.u16"} for s in samples)
    via_wds = np.concatenate([np.frombuffer(s["tokens.u16"], dtype="<u2") for s in samples])
    m = read_manifest(out)
    assert np.array_equal(via_wds, np.concatenate([read_shard(out, i) for i in m.split("train")]))


def test_same_output_for_any_worker_count_and_on_rerun(reference, small_inputs, tmp_path):
    out, manifest = reference
    one = shard(small_inputs, tmp_path / "one", val_fraction=0.1, shard_tokens=8000, workers=1)
    assert tar_bytes(tmp_path / "one") == tar_bytes(out)
    assert {k: v for k, v in one.items() if k != "command"} == {k: v for k, v in manifest.items() if k != "command"}
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("*.tar")}
    messages = []
    shard(small_inputs, tmp_path / "one", val_fraction=0.1, shard_tokens=8000, workers=2, log=messages.append)
    assert "nothing to do" in messages[-1]
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("*.tar")}


def test_split_is_stable_whatever_the_input_order(reference, small_inputs, tmp_path):
    out, _ = reference
    shard(list(reversed(small_inputs)), tmp_path / "rev", val_fraction=0.1, shard_tokens=3000, workers=2)
    for split in ("train", "val"):
        assert sorted(stored_docs(tmp_path / "rev", split)) == sorted(stored_docs(out, split))


def test_sigkill_mid_run_then_rerun_equals_clean_run(tmp_path):
    inputs = [str(p) for p in sorted(CORPUS.glob("*.txt"))]        # ~400k tokens, ~80 shards of 5000
    args = ["--input", *inputs, "--tokenizer", str(TOKENIZER), "--val-fraction", "0.05", "--shard-tokens", "5000",
            "--workers", "2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SHARD_CLI), "--no-progress", *args, "--output", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = killed / ".progress.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 4:   # header + 3 finished shards
            break
        time.sleep(0.005)
    assert proc.poll() is None, "shard.py finished before it could be killed; the test input is too small"
    os.killpg(proc.pid, signal.SIGKILL)                              # the job and its worker processes
    proc.wait(timeout=10)
    assert not (killed / "manifest.json").exists()

    clean = tmp_path / "clean"
    assert shard_cli(*args, "--output", str(clean)).returncode == 0
    clean_tars = tar_bytes(clean)
    partial = tar_bytes(killed)
    assert 3 <= len(partial) < len(clean_tars)
    assert all(data == clean_tars[name] for name, data in partial.items()), "a killed run left a half shard"
    journaled = [json.loads(line)["shard"]["name"] for line in journal.read_text().splitlines()[1:]]
    inodes = {name: (killed / name).stat().st_ino for name in journaled}

    rerun = shard_cli(*args, "--output", str(killed))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert tar_bytes(killed) == clean_tars
    assert not list(killed.glob("*.tmp"))
    assert {name: (killed / name).stat().st_ino for name in journaled} == inodes     # finished shards were kept
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (killed, clean))
    assert {k: v for k, v in m1.items() if k != "command"} == {k: v for k, v in m2.items() if k != "command"}


def test_bad_input_is_counted_and_reported(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("A first paragraph\nthat spans two lines.\n\nA second paragraph.\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"Caf\xe9 au lait.\n\nPlain text here.\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a JSON document"}\n{"body": "no text key"}\nnot json\n{"text": 5}\n'
                     '{"text": "  "}\n[1, 2]\n{"text": "another one"}\n')
    gz = tmp_path / "docs.txt.gz"
    gz.write_bytes(gzip.compress(b"Gzipped paragraph one.\n\nGzipped paragraph two.\n"))
    truncated = tmp_path / "cut.txt.gz"
    whole = gzip.compress((CORPUS / "blake-poems.txt").read_bytes())
    truncated.write_bytes(whole[:len(whole) // 2])
    r = shard_cli("--input", str(good), str(latin1), str(empty), str(jsonl), str(gz), str(truncated),
                  "--tokenizer", str(TOKENIZER), "--output", str(tmp_path / "out"), "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for text in (f"{latin1}:1: bytes that are not UTF-8", f"{empty}: holds no documents",
                 f"{jsonl}:2: no key 'text' (keys: body)", f"{jsonl}:3: not valid JSON",
                 f"{jsonl}:4: 'text' holds a int, not a string", f"{jsonl}:5: 'text' is empty",
                 f"{jsonl}:6: a JSON list, not an object", f"{truncated}: corrupt or truncated gzip"):
        assert text in r.stderr, text
    stats = json.loads((tmp_path / "out" / "manifest.json").read_text())["input_stats"]
    assert stats["documents"] > 8          # the paragraphs before the damage are kept
    assert stats == {"files": 6, "documents": stats["documents"], "text_chars": stats["text_chars"],
                     "undecodable_lines": 1, "empty_files": 1, "unreadable_files": 1, "jsonl_invalid": 2,
                     "jsonl_missing_key": 1, "jsonl_not_string": 1, "empty_documents": 1}
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    docs = stored_docs(tmp_path / "out", "train")
    assert docs[2] == sp.encode("Caf\ufffd au lait.") + [EOS_ID]              # kept, bad byte replaced
    assert docs[4] == sp.encode("a JSON document") + [EOS_ID]
    assert docs[6] == sp.encode("Gzipped paragraph one.") + [EOS_ID]


@pytest.mark.parametrize("make_input, message", [
    (lambda d: str(d / "missing.txt"), "input file {d}/missing.txt not found"),
    (lambda d: str(d / "*.nothing"), "input glob '{d}/*.nothing' matched no files"),
    (lambda d: str(d), "input {d} is a directory"),
    (lambda d: (d / "blank.txt").write_text("\n \n") and str(d / "blank.txt"), "no documents in the 1 input file(s)"),
    (lambda d: (d / "a.bin").write_bytes(bytes(range(256)) * 8) and str(d / "a.bin"),
     "input file {d}/a.bin is not text: 1256 of its first 2048 bytes are not UTF-8 text"),
    (lambda d: (d / "w.txt").write_text("Windows notes\n" * 50, encoding="utf-16") and str(d / "w.txt"),
     "input file {d}/w.txt is not text: 702 of its first 1402 bytes"),
    (lambda d: (d / "b.jsonl.gz").write_bytes(gzip.compress(bytes(1000))) and str(d / "b.jsonl.gz"),
     "input file {d}/b.jsonl.gz is not JSONL: 1000 of its first 1000 bytes"),
])
def test_fatal_input_errors_are_one_line_messages(tmp_path, make_input, message):
    r = shard_cli("--input", make_input(tmp_path), "--tokenizer", str(TOKENIZER), "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    assert message.format(d=tmp_path) in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and r.stderr.count("error: ") == 1
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_other_job_in_output_is_refused_unless_overwrite(reference, small_inputs, tmp_path):
    out = tmp_path / "o"
    shard(small_inputs[:1], out, val_fraction=0.1, shard_tokens=8000)
    with pytest.raises(DataError, match="different job"):
        shard(small_inputs[:1], out, val_fraction=0.2, shard_tokens=8000)
    m = shard(small_inputs[:1], out, val_fraction=0.2, shard_tokens=8000, overwrite=True)
    assert m["settings"]["val_fraction"] == 0.2
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["name"] for s in m["shards"])


def test_damaged_shard_of_finished_job_is_redone(reference, small_inputs, tmp_path):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = tar_bytes(copy)
    (copy / "train-000003.tar").write_bytes(b"damaged")
    messages = []
    shard(small_inputs, copy, val_fraction=0.1, shard_tokens=8000, workers=1, log=messages.append)
    assert any("missing or damaged (train-000003.tar)" in m for m in messages)
    assert tar_bytes(copy) == before


def test_lines_mode_and_text_key(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\nsecond line\n\nthird line\n")
    jsonl = tmp_path / "d.jsonl.gz"
    jsonl.write_bytes(gzip.compress(b'{"body": "from the body key"}\n'))
    m = shard([lines, jsonl], tmp_path / "o", val_fraction=0.0, text_mode="lines", text_key="body")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    expect = [sp.encode(t) + [EOS_ID] for t in ("first line", "second line", "third line", "from the body key")]
    assert stored_docs(tmp_path / "o", "train") == expect
    assert m["totals"]["val"] == {"shards": 0, "tokens": 0, "documents": 0}


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tokens = np.array([5, 70000, 3, 65535, 100000, 3], dtype=np.int64)
    w = ShardWriter(tmp_path, "train", 0, token_dtype(100_001))
    w.add_record(tokens[:3], 1)
    w.add_record(tokens[3:], 1)
    info = w.finish()
    assert info.records == 2 and info.tokens == 6
    assert read_shard(tmp_path, info).tolist() == tokens.tolist()


def reference_documents(data: bytes, text_mode: str) -> list[str]:
    """The definition, one line at a time: what the chunked, regex-based reader must reproduce."""
    docs, block = [], []
    for raw in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if text_mode == "lines":
            docs += [line] if line.strip() else []
        elif line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block))
            block = []
    return docs + (["\n".join(block)] if block else [])


def test_chunked_reader_matches_the_line_by_line_definition(tmp_path, monkeypatch):
    import random
    from dimba.data import documents
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\n", "\r", "\x0b", "\x1c", "\xa0", "é", "\u2028"]
    path = tmp_path / "fuzz.txt"
    for trial in range(400):
        data = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))).encode()
        if trial % 5 == 0:
            data = data.replace(b"b", b"\xff")                              # undecodable bytes too
        path.write_bytes(data)
        for read_bytes in (1, 7, 1 << 20):
            monkeypatch.setattr(documents, "READ_BYTES", read_bytes)
            for mode in ("blocks", "lines"):
                got = list(iter_documents([path], text_mode=mode, stats=InputStats(warn=lambda m: None)))
                assert got == reference_documents(data, mode), (data, read_bytes, mode)
    monkeypatch.setattr(documents, "READ_BYTES", 5)
    path.write_bytes(b"first\r\nblock\n\n\nsecond caf\xe9\n \t\nthird\nlines\n\n" * 3 + b"last")
    messages: list[str] = []
    docs = list(iter_documents([path], stats=InputStats(warn=messages.append)))
    assert docs == ["first\nblock", "second caf\ufffd", "third\nlines"] * 3 + ["last"]
    lines = [re.search(r"fuzz.txt:(\d+): bytes that are not UTF-8", m).group(1) for m in messages]
    assert lines == ["5", "14", "23"]


def test_documents_reader_counts_in_order(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one\n\n\n\ntwo\nstill two\n")
    stats = InputStats(warn=lambda m: None)
    assert list(iter_documents(expand_inputs([str(a)]), stats=stats)) == ["one", "two\nstill two"]
    assert stats.documents == 2 and stats.files == 1
    with pytest.raises(DataError, match="given twice"):
        expand_inputs([str(a), str(tmp_path / "*.txt")])


def test_an_old_normalising_tokenizer_still_shards_with_a_warning(tmp_path):
    import io
    model = io.BytesIO()
    lines = [line for line in (CORPUS / "blake-poems.txt").read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    (tmp_path / "old.model").write_bytes(model.getvalue())        # NFKC, no <mask>: as DIMBA trained them before
    messages = []
    manifest = run_shard_job(ShardJob(inputs=[str(CORPUS / "blake-poems.txt")], tokenizer=str(tmp_path / "old.model"),
                                      output=str(tmp_path / "out"), progress=False, log=messages.append))
    assert manifest["vocab_size"] == 400 and manifest["totals"]["train"]["documents"] > 200
    assert any(m.startswith(f"warning: tokenizer {tmp_path}/old.model normalises text (nmt_nfkc") for m in messages)
