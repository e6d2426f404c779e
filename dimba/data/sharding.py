"""The sharding job behind data_prep/shard.py: documents -> token ids -> WebDataset shards.

How it stays parallel, deterministic and resumable:
  * The main process reads documents in input order (the global document index g)
    and sends batches of about BATCH_CHARS characters to worker processes, which
    encode them with sentencepiece and decide each document's split; results come
    back in submission order, so the output never depends on the number of workers.
  * Split: a document goes to val when a keyed hash of its text is below
    --val-fraction. The decision needs nothing but the text: it is the same
    whatever the input order, the worker count or the shard size, and duplicated
    documents land in the same split.
  * Each split fills records of about RECORD_TOKENS tokens and shards of about
    --shard-tokens tokens (whole documents only, EOS after each). Shard boundaries
    depend only on the token stream, so the same inputs give byte-identical shards.
  * Every finished shard is renamed into place, then a line naming it and the first
    document after it is appended to OUT/.progress.jsonl. A re-run checks the
    journal's shards (size and sha256), keeps them, skips the documents they hold
    without tokenizing them, and continues. The journal's first line fingerprints
    the job (inputs' sha256, tokenizer, settings): a different job is refused.
  * manifest.json is written last; a directory without it is unfinished.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from dimba.data.documents import (Format, InputStats, TextMode, check_text_files, expand_inputs, file_sha256,
                                  iter_corpus_lists)
from dimba.data.errors import DataError
from dimba.data.shards import (MANIFEST_NAME, MANIFEST_VERSION, SPLITS, ShardInfo, ShardWriter, manifest_to_json,
                               shard_dicts, token_dtype, write_atomic)
from dimba.data.tokenizer import EOS_ID, PAD_ID, Tokenizer

RECORD_TOKENS = 1 << 16            # tokens per WebDataset sample (whole documents; a longer document is one record)
BATCH_CHARS = 1 << 18              # characters of text per task sent to a worker
JOURNAL_NAME = ".progress.jsonl"
SPLIT_KEY = b"dimba-val-split"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_fraction(text: str) -> float:
    """A stable number in [0, 1) from the document's text alone; val when below --val-fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=SPLIT_KEY).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


@dataclass
class ShardJob:
    inputs: list[str]                  # files or globs
    tokenizer: str                     # tokenizer.model
    output: str                        # shard directory
    val_fraction: float = 0.01
    shard_tokens: int = 2_000_000
    workers: int = 0                   # 0: all cores
    fmt: Format = "auto"
    text_mode: TextMode = "blocks"
    text_key: str = "text"
    progress: bool = True
    overwrite: bool = False
    command: str = ""
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


# ---- worker side: module globals set once per process by _init_worker -------------------------------------------
_SP: Optional[spm.SentencePieceProcessor] = None
_VAL_FRACTION = 0.0
_DTYPE = np.dtype("<u2")


def _init_worker(model_path: str, val_fraction: float, dtype: str) -> None:
    global _SP, _VAL_FRACTION, _DTYPE
    _SP = spm.SentencePieceProcessor(model_file=model_path)
    _VAL_FRACTION, _DTYPE = val_fraction, np.dtype(dtype)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all tokens with EOS after each document, per-document lengths incl. EOS, per-document is-val)."""
    ids = _SP.encode(texts, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_DTYPE, count=int(lengths.sum()))
    flat = np.insert(flat, np.cumsum(lengths), EOS_ID)
    is_val = np.fromiter((split_fraction(t) < _VAL_FRACTION for t in texts), dtype=bool, count=len(texts))
    return flat, lengths + 1, is_val


# ---- main side ---------------------------------------------------------------------------------------------------
class _SplitWriter:
    """Fills records and shards of one split from (document index, tokens) in document order."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, done: list[ShardInfo],
                 skip_before: int, journal: Callable[[ShardInfo, int], None]):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.done, self.skip_before, self.journal = list(done), skip_before, journal
        self.writer: Optional[ShardWriter] = None
        self.record: list[np.ndarray] = []
        self.record_tokens = self.record_docs = 0
        self.last_doc = -1

    def add(self, doc_index: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Documents in order: global indices, token counts (EOS included), all their tokens concatenated.

        Same result as adding one document at a time (after each: close the record at
        RECORD_TOKENS, the shard at shard_tokens), found with one search per record or shard.
        """
        keep = doc_index >= self.skip_before       # documents already in a finished shard of this split
        if not keep.all():
            doc_index, tokens, lengths = doc_index[keep], tokens[np.repeat(keep, lengths)], lengths[keep]
        ends = np.cumsum(lengths)
        done_docs = done_tokens = 0
        while done_docs < len(lengths):
            if self.writer is None:
                self.writer = ShardWriter(self.out, self.split, len(self.done), self.dtype)
            room = min(RECORD_TOKENS - self.record_tokens,
                       self.shard_tokens - self.writer.tokens - self.record_tokens)
            j = min(int(np.searchsorted(ends, done_tokens + room)), len(lengths) - 1)   # last document to take
            self.record.append(tokens[done_tokens:ends[j]])
            self.record_tokens += int(ends[j]) - done_tokens
            self.record_docs += j + 1 - done_docs
            self.last_doc = int(doc_index[j])
            done_docs, done_tokens = j + 1, int(ends[j])
            if self.record_tokens >= RECORD_TOKENS:
                self._close_record()
            if self.writer.tokens + self.record_tokens >= self.shard_tokens:
                self.finish()

    def _close_record(self) -> None:
        if self.record:
            self.writer.add_record(np.concatenate(self.record), self.record_docs)
            self.record, self.record_tokens, self.record_docs = [], 0, 0

    def finish(self) -> None:
        if self.writer is None:
            return
        self._close_record()
        info = self.writer.finish()
        self.done.append(info)
        self.journal(info, self.last_doc + 1)
        self.writer = None


def _fingerprint(job: ShardJob, inputs: list[Path], tok: Tokenizer) -> dict:
    return {"version": MANIFEST_VERSION, "inputs_sha256": [file_sha256(p) for p in inputs],
            "tokenizer_sha256": tok.sha256, "val_fraction": job.val_fraction, "shard_tokens": job.shard_tokens,
            "record_tokens": RECORD_TOKENS, "format": job.fmt, "text_mode": job.text_mode, "text_key": job.text_key}


def _remove_outputs(out: Path) -> None:
    for pattern in (MANIFEST_NAME, JOURNAL_NAME, "tokenizer.model", "train-*.tar", "val-*.tar", "*.tar.tmp",
                    "*.json.tmp", "*.model.tmp"):
        for path in out.glob(pattern):
            path.unlink()


def _shard_ok(out: Path, info: ShardInfo) -> bool:
    path = out / info.name
    return path.is_file() and path.stat().st_size == info.bytes and file_sha256(path) == info.sha256


def _read_journal(out: Path) -> tuple[list[dict], dict[str, list[ShardInfo]], dict[str, int]]:
    """The journal's good entries; finished shards per split; per split, the first document not in them."""
    done: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    next_doc = {s: 0 for s in SPLITS}
    kept: list[dict] = []
    broken: set[str] = set()
    for line in (out / JOURNAL_NAME).read_text().splitlines()[1:]:
        try:
            entry = json.loads(line)
            info, nd = ShardInfo(**entry["shard"]), int(entry["next_doc"])
        except (ValueError, KeyError, TypeError):
            break                      # a line torn by a kill: everything before it is good
        s = info.split
        if s in broken or info.name != f"{s}-{len(done[s]):06d}.tar" or not _shard_ok(out, info):
            broken.add(s)              # redo this shard and the ones after it
            continue
        done[s].append(info)
        next_doc[s] = nd
        kept.append(entry)
    return kept, done, next_doc


def _prepare_output(job: ShardJob, out: Path, fingerprint: dict) -> Optional[dict]:
    """Make OUT ready; returns the existing manifest when the same job already finished there."""
    out.mkdir(parents=True, exist_ok=True)
    if job.overwrite:
        _remove_outputs(out)
    manifest_path, journal_path = out / MANIFEST_NAME, out / JOURNAL_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("job") != fingerprint:
            raise DataError(f"{out} already holds shards of a different job (other inputs, tokenizer or settings); "
                            "pass --overwrite to replace them or choose another --output")
        bad = [s["name"] for s in manifest["shards"] if not _shard_ok(out, ShardInfo(**s))]
        if not bad:
            return manifest
        job.log(f"{len(bad)} shard(s) of the finished job in {out} are missing or damaged ({', '.join(bad[:3])}); "
                "redoing them")
        manifest_path.unlink()
    if journal_path.is_file():
        first = journal_path.read_text().split("\n", 1)[0]
        try:
            same = json.loads(first).get("fingerprint") == fingerprint
        except json.JSONDecodeError:
            same = False
        if not same:
            raise DataError(f"{out} holds an unfinished shard job with other inputs, tokenizer or settings; "
                            "pass --overwrite to start over or choose another --output")
    elif any(out.glob("train-*.tar")) or any(out.glob("val-*.tar")):
        raise DataError(f"{out} holds shards without a manifest or progress journal; "
                        "pass --overwrite to replace them or choose another --output")
    if not journal_path.is_file():
        journal_path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    for tmp in out.glob("*.tmp"):
        tmp.unlink()                   # half-written files of a killed run
    return None


def _start_method() -> str:
    """fork where it exists: workers start at once and inherit the imports, and the pool is made before
    this process starts any thread (progress bar); elsewhere spawn."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _document_batches(job: ShardJob, inputs: list[Path], stats: InputStats, start_doc: int):
    """(index of the first document, texts) of about BATCH_CHARS characters, from document start_doc on."""
    texts: list[str] = []
    first = g = start_doc              # index of texts[0]; of the next document
    chars, read = 0, 0
    for docs in iter_corpus_lists(inputs, job.fmt, job.text_mode, job.text_key, stats):
        skip = max(0, start_doc - read)    # already in finished shards: read (to count) but not tokenized
        read += len(docs)
        for doc in docs[skip:] if skip else docs:
            texts.append(doc)
            chars += len(doc)
            g += 1
            if chars >= BATCH_CHARS:
                yield first, texts
                first, texts, chars = g, [], 0
    if texts:
        yield first, texts


def _encode_all(job: ShardJob, workers: int, initargs: tuple, batches, route) -> None:
    """Encode every batch (in worker processes when workers > 1) and route the results in batch order."""
    if workers == 1:
        _init_worker(*initargs)
        for first, texts in batches():
            route(first, _encode(texts))
        return
    # ProcessPoolExecutor, unlike multiprocessing.Pool, raises instead of hanging when a worker dies
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(_start_method()), initializer=_init_worker,
                             initargs=initargs) as pool:
        try:
            pool.submit(int).result()  # start the workers now, before the progress bar's thread exists
            pending: deque = deque()
            for first, texts in batches():
                pending.append((first, pool.submit(_encode, texts)))
                while len(pending) > 2 * workers:
                    f, res = pending.popleft()
                    route(f, res.result())
            while pending:
                f, res = pending.popleft()
                route(f, res.result())
        except BrokenProcessPool:
            raise DataError("a tokenizing worker process died (out of memory? or, when calling run_shard_job "
                            "from your own script, the call is not under `if __name__ == '__main__':`); "
                            "finished shards are kept, re-run to continue") from None


def run_shard_job(job: ShardJob) -> dict:
    """Tokenize the inputs into shards in job.output; returns the manifest (also written to manifest.json)."""
    if not 0.0 <= job.val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {job.val_fraction}")
    if job.shard_tokens < 1:
        raise DataError(f"--shard-tokens must be positive, got {job.shard_tokens}")
    if job.workers < 0:
        raise DataError(f"--workers must be >= 1 (or 0 for all cores), got {job.workers}")
    workers = job.workers or cpu_count()
    inputs = expand_inputs(job.inputs)
    check_text_files(inputs, job.fmt)
    tok = Tokenizer(job.tokenizer)
    if tok.normalizes:
        job.log(f"warning: tokenizer {tok.path} normalises text ({tok.normalization}), so decoded shards differ "
                "from the input; data_prep/train_tokenizer.py trains one that keeps text exactly")
    out = Path(job.output)
    fingerprint = _fingerprint(job, inputs, tok)
    finished = _prepare_output(job, out, fingerprint)
    if finished is not None:
        job.log(f"{out} already holds this job's {len(finished['shards'])} shards (checksums verified); nothing to do")
        return finished

    journal_path = out / JOURNAL_NAME
    kept, done, next_doc = _read_journal(out)
    write_atomic(journal_path, "\n".join([json.dumps({"fingerprint": fingerprint})]
                                         + [json.dumps(e) for e in kept]).encode() + b"\n")
    if kept:
        job.log(f"resuming: {len(kept)} finished shard(s) in {out} are kept, "
                f"tokenizing from document {min(next_doc.values())}")
    if not (out / "tokenizer.model").is_file() or file_sha256(out / "tokenizer.model") != tok.sha256:
        write_atomic(out / "tokenizer.model", tok.path.read_bytes())
    dtype = token_dtype(tok.vocab_size)
    stats = InputStats(warn=lambda msg: tqdm.write(msg, file=sys.stderr) if job.progress else job.log(msg))
    t0 = time.perf_counter()
    new_tokens = 0

    with open(journal_path, "a") as journal:
        def record_shard(info: ShardInfo, next_document: int) -> None:
            journal.write(json.dumps({"shard": asdict(info), "next_doc": next_document}) + "\n")
            journal.flush()            # no fsync: a resume re-checks every journaled shard's size and sha256

        writers = {s: _SplitWriter(out, s, dtype, job.shard_tokens, done[s], next_doc[s], record_shard)
                   for s in SPLITS}
        bar = None

        def route(first_doc: int, result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            nonlocal new_tokens, bar
            if bar is None:
                bar = tqdm(unit="tok", unit_scale=True, desc="sharding", disable=not job.progress,
                           file=sys.stderr, initial=sum(i.tokens for s in SPLITS for i in done[s]))
            tokens, lengths, is_val = result
            doc_index = np.arange(first_doc, first_doc + len(lengths))
            for split, chosen in (("train", ~is_val), ("val", is_val)):
                if chosen.any():
                    writers[split].add(doc_index[chosen], lengths[chosen], tokens[np.repeat(chosen, lengths)])
            new_tokens += len(tokens)
            bar.update(len(tokens))
            bar.set_postfix(docs=stats.documents, shards=sum(len(w.done) for w in writers.values()), refresh=False)

        # a path, not the model's bytes: a spawned worker that fails to start would leave us blocked
        # writing arguments larger than a pipe buffer
        initargs = (str(out / "tokenizer.model"), job.val_fraction, dtype.str)
        try:
            _encode_all(job, workers, initargs, lambda: _document_batches(job, inputs, stats, min(next_doc.values())),
                        route)
        finally:
            if bar is not None:
                bar.close()
        if stats.documents == 0:
            raise DataError(f"no documents in the {len(inputs)} input file(s) (see the warnings above); "
                            "nothing to shard")
        for w in writers.values():
            w.finish()
    for line in stats.summary_lines():
        job.log(line)
    elapsed = time.perf_counter() - t0
    shards = {s: writers[s].done for s in SPLITS}
    if not shards["train"]:
        raise DataError(f"all {stats.documents} documents fell into val (--val-fraction {job.val_fraction}); "
                        "give more text or a smaller --val-fraction")
    if job.val_fraction > 0 and not shards["val"]:
        job.log(f"warning: no document fell into val ({stats.documents} documents, --val-fraction "
                f"{job.val_fraction}); the val split is empty")
    manifest = _manifest(job, tok, dtype, shards, stats, inputs, fingerprint)
    write_atomic(out / MANIFEST_NAME, manifest_to_json(manifest).encode(), durable=True)
    total = manifest["totals"]
    job.log(f"wrote {out}: train {total['train']['shards']} shards / {total['train']['tokens']:,} tokens / "
            f"{total['train']['documents']:,} docs, val {total['val']['shards']} shards / {total['val']['tokens']:,} "
            f"tokens / {total['val']['documents']:,} docs; {new_tokens:,} tokens encoded in {elapsed:.1f}s "
            f"({new_tokens / max(elapsed, 1e-9):,.0f} tokens/s, {workers} worker(s))")
    return manifest


def _manifest(job: ShardJob, tok: Tokenizer, dtype: np.dtype, shards: dict[str, list[ShardInfo]],
              stats: InputStats, inputs: list[Path], fingerprint: dict) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "vocab_size": tok.vocab_size, "eos_id": EOS_ID, "pad_id": PAD_ID,
        "tokenizer": {"file": "tokenizer.model", "source": str(tok.path), "sha256": tok.sha256},
        "settings": {"val_fraction": job.val_fraction, "shard_tokens": job.shard_tokens,
                     "record_tokens": RECORD_TOKENS, "format": job.fmt, "text_mode": job.text_mode,
                     "text_key": job.text_key},
        "totals": {s: {"shards": len(v), "tokens": sum(i.tokens for i in v), "documents": sum(i.documents for i in v)}
                   for s, v in shards.items()},
        "input_stats": stats.to_dict(),
        "inputs": [{"path": str(p), "sha256": h} for p, h in zip(inputs, fingerprint["inputs_sha256"])],
        "shards": shard_dicts(shards["train"] + shards["val"]),
        "job": fingerprint,
        "command": job.command,
    }


def add_shard_arguments(parser, val_fraction: float) -> None:
    """The reading and sharding options data_prep/shard.py and data_prep/prepare.py share (ShardJob's fields)."""
    parser.add_argument("--val-fraction", type=float, default=val_fraction,
                        help=f"fraction of documents (chosen by a hash of their text) for val (default {val_fraction})")
    parser.add_argument("--shard-tokens", type=int, default=2_000_000, help="tokens per shard, about (default 2e6)")
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes (default 0: all cores)")
    parser.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto",
                        help="auto: .jsonl/.ndjson/.json(.gz) are JSONL, the rest text")
    parser.add_argument("--text-mode", choices=["blocks", "lines"], default="blocks",
                        help="text files: one document per blank-line-separated block (default), or per line")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text (default 'text')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
