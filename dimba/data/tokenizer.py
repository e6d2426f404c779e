"""The sentencepiece tokenizer: DIMBA's special ids, training, and a small wrapper.

The special ids are defined HERE and nowhere else; every tokenizer DIMBA trains
has them, and `Tokenizer` refuses a model that does not:

    PAD_ID = 0   <pad>  fills nothing in packed training data; the model config's pad_id
    UNK_ID = 1   <unk>  (rare: byte fallback spells unknown characters as <0xNN> byte pieces)
    BOS_ID = 2   <s>    not added by the data pipeline; free for prompts
    EOS_ID = 3   </s>   written after every document in the shards

Text normalisation is sentencepiece's default (NFKC, whitespace runs and newlines
become one space), so decode(encode(text)) equals the text up to whitespace.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import sentencepiece as spm

from dimba.data.documents import Format, InputStats, TextMode, iter_documents
from dimba.data.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
MODEL_NAME, INFO_NAME = "tokenizer.model", "tokenizer.json"
MAX_SENTENCE_CHARS = 4096          # longer lines are cut for training only (sentencepiece skips over-long ones)


class Tokenizer:
    """A sentencepiece model with DIMBA's special ids.

    >>> tok = Tokenizer("data_prep/tokenizer/tokenizer.model")
    >>> tok.decode(tok.encode("It was a dark night."))
    'It was a dark night.'
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} not found; train one with data_prep/train_tokenizer.py "
                            "or use data_prep/tokenizer/tokenizer.model")
        self._data = self.path.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._data)
        except Exception:
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model (could not load it)") from None
        got = {"pad": self.sp.pad_id(), "unk": self.sp.unk_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id()}
        if got != SPECIAL_IDS:
            raise DataError(f"tokenizer {self.path} has special ids {got} but DIMBA needs {SPECIAL_IDS}; "
                            "retrain it with data_prep/train_tokenizer.py")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._data).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, no BOS/EOS added."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (a list, numpy array or tensor); special ids (pad, bos, eos) are dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def _sample_fraction(text: str) -> float:
    """A stable pseudo-random number in [0, 1) per document (its own salt: independent of the val split)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"dimba-tok-sample").digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _training_sentences(docs: Iterable[str], keep: float) -> Iterator[str]:
    for doc in docs:
        if keep < 1.0 and _sample_fraction(doc) >= keep:
            continue
        for line in doc.split("\n"):
            line = line.strip()
            for i in range(0, len(line), MAX_SENTENCE_CHARS):
                yield line[i:i + MAX_SENTENCE_CHARS]


def train_tokenizer(inputs: list[Path], vocab_size: int, output_dir: str | Path, model_type: str = "bpe",
                    sample_chars: int = 100_000_000, fmt: Format = "auto", text_mode: TextMode = "blocks",
                    text_key: str = "text", character_coverage: float = 0.9995, num_threads: Optional[int] = None,
                    command: str = "") -> dict:
    """Train a sentencepiece model on a deterministic sample of the documents.

    Documents are kept by a hash of their text so that about `sample_chars` characters
    remain: the same inputs give the same sample (and, for BPE, the same model bytes).
    Writes DIR/tokenizer.model and DIR/tokenizer.json; returns the JSON's content.
    """
    if vocab_size < 260:
        raise DataError(f"--vocab-size must be at least 260 (4 special ids + 256 byte pieces), got {vocab_size}")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be 'bpe' or 'unigram', got {model_type!r}")
    quiet = InputStats(warn=lambda msg: None)
    total = sum(len(doc) for doc in iter_documents(inputs, fmt, text_mode, text_key, quiet))
    if total == 0:
        raise DataError(f"no documents in the {len(inputs)} input file(s); nothing to train on")
    keep = min(1.0, sample_chars / total)
    stats = InputStats()
    docs = iter_documents(inputs, fmt, text_mode, text_key, stats)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(docs, keep), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            character_coverage=character_coverage, split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=SPECIAL_PIECES["pad"], unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"],
            input_sentence_size=0, shuffle_input_sentence=False,   # we sample ourselves, deterministically
            max_sentence_length=4 * MAX_SENTENCE_CHARS, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model on these inputs "
                        f"({str(e).strip()}); use a smaller --vocab-size or more text") from None
    for line in stats.summary_lines():
        stats.warn(line)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = model.getvalue()
    (out / MODEL_NAME).write_bytes(data)
    tok = Tokenizer(out / MODEL_NAME)
    info = {
        "model": MODEL_NAME,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "model_type": model_type,
        "byte_fallback": True,
        "normalization": "nmt_nfkc (sentencepiece default: NFKC; newlines and whitespace runs become one space)",
        "special_ids": dict(SPECIAL_IDS),
        "special_pieces": dict(SPECIAL_PIECES),
        "trained_on": {"inputs": [str(p) for p in inputs], "documents": stats.documents,
                       "sampled_fraction": round(keep, 6), "input_stats": stats.to_dict()},
        "command": command,
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info
