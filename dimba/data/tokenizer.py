"""The sentencepiece tokenizer: DIMBA's special ids, training, and a small wrapper.

The special ids are defined HERE and nowhere else; every tokenizer DIMBA trains
has them, and `Tokenizer` refuses a model without the first four:

    PAD_ID  = 0   <pad>   fills nothing in packed training data; the model config's pad_id
    UNK_ID  = 1   <unk>   never produced: byte fallback spells unknown characters as <0xNN> byte pieces
    BOS_ID  = 2   <s>     not added by the data pipeline; free for prompts
    EOS_ID  = 3   </s>    written after every document in the shards
    MASK_ID = 4   <mask>  the absorbing state of masked diffusion; a tokenizer trained before it existed
                          has none (`Tokenizer.mask_id` is None) or gets one appended by `add_mask_piece`

Text is kept exactly: training uses sentencepiece's identity normalisation and keeps
whitespace runs, so decode(encode(text)) == text for any text without control
characters (tab, newline and CR are kept; the one other exception is U+2581 '▁',
sentencepiece's own space symbol, which decodes to a space). Newlines are ordinary
characters, learnt inside documents. A tokenizer trained before this (NFKC, whitespace
runs and newlines become one space) still loads and says so: `Tokenizer.normalizes`.

Control pieces (<pad>, <s>, </s>, <mask>) are never produced by encode and decode to
nothing. `decode` emits only what an input could have held: see `Tokenizer.decode`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import sentencepiece as spm

from dimba.data.documents import Format, InputStats, TextMode, check_text_files, file_sha256, iter_documents
from dimba.data.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}          # required of every tokenizer
SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
MASK_PIECE = "<mask>"
MODEL_NAME, INFO_NAME = "tokenizer.model", "tokenizer.json"
MAX_SENTENCE_CHARS = 4096          # longer documents are cut for training only (sentencepiece skips over-long ones)
KEPT_CONTROLS = "\t\n\r"           # the control characters text may hold; decode drops every other one
_DROPPED_CONTROLS = {c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in KEPT_CONTROLS}  # Cc
EXACT_TEXT = "identity (text is kept exactly: no Unicode normalisation, whitespace runs and newlines kept)"
OLD_NFKC = "nmt_nfkc (sentencepiece default: NFKC; newlines and whitespace runs become one space)"


def _model_proto(data: bytes):
    """The ModelProto of a serialized sentencepiece model (sentencepiece ships the protobuf module)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:           # protobuf missing: it comes with tensorboard, a dependency
        raise DataError(f"reading a tokenizer's settings needs protobuf ({e}); pip install protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


class Tokenizer:
    """A sentencepiece model with DIMBA's special ids.

    >>> tok = Tokenizer("data_prep/tokenizer/tokenizer.model")
    >>> tok.decode(tok.encode("It was a dark night.\\n\\tThe end."))
    'It was a dark night.\\n\\tThe end.'
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
        mask = self.sp.piece_to_id(MASK_PIECE)
        self.mask_id: Optional[int] = mask if self.sp.id_to_piece(mask) == MASK_PIECE and self.sp.is_control(mask) \
            else None
        spec = _model_proto(self._data).normalizer_spec
        # True for a tokenizer trained before DIMBA kept text exactly (NFKC, whitespace collapsed)
        self.normalizes: bool = spec.name != "identity" or spec.remove_extra_whitespaces
        self._rule = spec.name
        # per id: its byte (0-255) for a <0xNN> byte piece, else -1; and whether encode never emits it
        n = self.sp.vocab_size()
        self._byte = [int(self.sp.id_to_piece(i)[3:5], 16) if self.sp.is_byte(i) else -1 for i in range(n)]
        self._never = [self.sp.is_control(i) or self.sp.is_unknown(i) for i in range(n)]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._data).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def normalization(self) -> str:
        if not self.normalizes:
            return EXACT_TEXT
        return OLD_NFKC if self._rule == "nmt_nfkc" else f"{self._rule} (sentencepiece's rule of that name)"

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, no BOS/EOS added."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (a list, numpy array or tensor), holding nothing an input could not have held.

        The rule: ids that encode never emits decode to nothing (<pad>, <unk>, <s>, </s>,
        <mask>); byte pieces count only where they spell a whole UTF-8 character (a stray
        or broken byte is dropped, never a U+FFFD); and no control character but tab,
        newline and CR is emitted. On the ids of encode(text) this is sentencepiece's own
        decode, so decode(encode(text)) == text for text without other control characters.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise DataError(f"token id {i} is out of range for tokenizer {self.path} ({n} pieces)")
        kept, run = [], []
        for i in ids:
            if self._byte[i] >= 0:
                run.append(i)
                continue
            if run:
                kept.extend(self._whole_characters(run))
                run = []
            if not self._never[i]:
                kept.append(i)
        if run:
            kept.extend(self._whole_characters(run))
        return self.sp.decode(kept).translate(_DROPPED_CONTROLS)

    def _whole_characters(self, run: list[int]) -> list[int]:
        """The byte-piece ids of `run` that spell whole UTF-8 characters, in order; the other bytes dropped."""
        raw = bytes(self._byte[i] for i in run)
        out, k = [], 0
        while k < len(raw):
            for width in range(1, min(4, len(raw) - k) + 1):   # a valid character's shortest decodable prefix
                try:
                    raw[k:k + width].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                out.extend(run[k:k + width])
                k += width
                break
            else:
                k += 1                 # not the start of a whole character: drop this byte
        return out

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def tokenizer_info(tok: Tokenizer, **fields) -> dict:
    """The content of tokenizer.json: what the model is, then how it was made (`fields`)."""
    special_ids, special_pieces = dict(SPECIAL_IDS), dict(SPECIAL_PIECES)
    if tok.mask_id is not None:
        special_ids["mask"], special_pieces["mask"] = tok.mask_id, MASK_PIECE
    return {"model": MODEL_NAME, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "byte_fallback": True,
            "normalizes": tok.normalizes, "normalization": tok.normalization, "mask_id": tok.mask_id,
            "special_ids": special_ids, "special_pieces": special_pieces, **fields}


def _write_tokenizer(out: Path, data: bytes, **fields) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_NAME).write_bytes(data)
    info = tokenizer_info(Tokenizer(out / MODEL_NAME), **fields)
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def add_mask_piece(src_model: str | Path, output_dir: str | Path, command: str = "") -> dict:
    """Copy a tokenizer that has no <mask> into DIR with a <mask> CONTROL piece appended, without retraining.

    The mask's id is the old vocabulary size; every old piece keeps its id, so encode gives
    the same ids as before (shards are still re-made with it: their manifest names the
    tokenizer and its size, which the loader checks). Its normalisation is the old one's.
    Writes DIR/tokenizer.model and DIR/tokenizer.json; returns the JSON's content.
    """
    src = Tokenizer(src_model)
    out = Path(output_dir)
    if src.mask_id is not None:
        raise DataError(f"tokenizer {src.path} already has {MASK_PIECE} at id {src.mask_id}; use it as it is")
    if src.sp.piece_to_id(MASK_PIECE) != UNK_ID:
        raise DataError(f"tokenizer {src.path} has a piece {MASK_PIECE!r} that is not a control piece; "
                        "retrain it with data_prep/train_tokenizer.py")
    if (out / MODEL_NAME).resolve() == src.path.resolve():
        raise DataError(f"--output {out} holds the source tokenizer; write the new one to another directory "
                        "(shards made with the old one name its sha256)")
    from sentencepiece import sentencepiece_model_pb2
    proto = _model_proto(src.path.read_bytes())
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = MASK_PIECE, 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.control_symbols.append(MASK_PIECE)
    model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
    return _write_tokenizer(out, proto.SerializeToString(), model_type=model_type,
                            derived_from={"model": str(src.path), "sha256": src.sha256,
                                          "change": f"{MASK_PIECE} appended at id {src.vocab_size}"},
                            command=command)


def _sample_fraction(text: str) -> float:
    """A stable pseudo-random number in [0, 1) per document (its own salt: independent of the val split)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"dimba-tok-sample").digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _training_sentences(docs: Iterable[str], keep: float) -> Iterator[str]:
    """Whole documents, newlines and all (a 'sentence' to sentencepiece is one string, not one line)."""
    for doc in docs:
        if keep < 1.0 and _sample_fraction(doc) >= keep:
            continue
        for i in range(0, len(doc), MAX_SENTENCE_CHARS):
            yield doc[i:i + MAX_SENTENCE_CHARS]


def training_settings(vocab_size: int, model_type: str = "bpe", sample_chars: int = 100_000_000,
                      fmt: Format = "auto", text_mode: TextMode = "blocks", text_key: str = "text",
                      character_coverage: float = 0.9995) -> dict:
    """The settings tokenizer.json records (with the inputs' sha256, what makes a training the same one)."""
    return {"vocab_size": vocab_size, "model_type": model_type, "sample_chars": sample_chars, "format": fmt,
            "text_mode": text_mode, "text_key": text_key, "character_coverage": character_coverage}


def train_tokenizer(inputs: list[Path], vocab_size: int, output_dir: str | Path, model_type: str = "bpe",
                    sample_chars: int = 100_000_000, fmt: Format = "auto", text_mode: TextMode = "blocks",
                    text_key: str = "text", character_coverage: float = 0.9995, num_threads: Optional[int] = None,
                    command: str = "") -> dict:
    """Train a sentencepiece model on a deterministic sample of the documents.

    Documents are kept by a hash of their text so that about `sample_chars` characters
    remain: the same inputs give the same sample (and, for BPE, the same model bytes).
    Writes DIR/tokenizer.model and DIR/tokenizer.json; returns the JSON's content.
    """
    if vocab_size < 261:
        raise DataError(f"--vocab-size must be at least 261 (5 special ids + 256 byte pieces), got {vocab_size}")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be 'bpe' or 'unigram', got {model_type!r}")
    check_text_files(inputs, fmt)
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
            normalization_rule_name="identity", remove_extra_whitespaces=False,   # text kept exactly
            allow_whitespace_only_pieces=True,     # runs of spaces (indentation) become pieces of their own
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=SPECIAL_PIECES["pad"], unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"],
            control_symbols=[MASK_PIECE],          # the first id after the four above: MASK_ID
            input_sentence_size=0, shuffle_input_sentence=False,   # we sample ourselves, deterministically
            max_sentence_length=4 * MAX_SENTENCE_CHARS, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model on these inputs "
                        f"({str(e).strip()}); use a smaller --vocab-size or more text") from None
    for line in stats.summary_lines():
        stats.warn(line)
    settings = training_settings(vocab_size, model_type, sample_chars, fmt, text_mode, text_key, character_coverage)
    info = _write_tokenizer(
        Path(output_dir), model.getvalue(), model_type=model_type, settings=settings,
        trained_on={"inputs": [str(p) for p in inputs], "inputs_sha256": [file_sha256(p) for p in inputs],
                    "documents": stats.documents, "sampled_fraction": round(keep, 6),
                    "input_stats": stats.to_dict()},
        command=command)
    if info["mask_id"] != MASK_ID:     # sentencepiece places control symbols right after the special ids
        raise DataError(f"sentencepiece put {MASK_PIECE} at id {info['mask_id']}, not {MASK_ID}")
    return info
