"""Token shards on disk: WebDataset tars plus one manifest.json.

Layout of a shard directory (written by data_prep/shard.py, see sharding.py):
    manifest.json          every shard with tokens, documents, bytes, sha256; tokenizer; totals; input counts
    tokenizer.model        a copy of the tokenizer the shards were made with
    train-000000.tar ...   val-000000.tar ...

A shard is a plain WebDataset tar (any WebDataset reader opens it). Each sample
("record") holds whole documents, each followed by EOS, as one little-endian array:
`<key>.tokens.u16` (vocabularies up to 65,536 pieces) or `<key>.tokens.u32`. Tar
members have fixed metadata (USTAR, mtime 0, uid/gid 0, no user names, mode 0644),
so the same tokens give byte-identical tars. Writing uses the standard tarfile
module (what webdataset's TarWriter wraps) so that the sharding processes need not
import webdataset, which imports torch; reading goes through webdataset.
A shard is built in memory, written to `<name>.tmp` and renamed: a file with the
final name is always complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dimba.data.errors import CorruptShardError, DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65,536 pieces, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _token_field(dtype: np.dtype) -> str:
    return "tokens.u16" if dtype.itemsize == 2 else "tokens.u32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    name: str          # file name inside the shard directory
    split: str         # "train" or "val"
    tokens: int        # including one EOS per document
    documents: int
    records: int       # WebDataset samples in the tar
    bytes: int
    sha256: str


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """Write to <path>.tmp and rename: no process ever sees a half-written file under the final name.

    Shards skip fsync (it serialises the writer on slow disks): after a power loss a
    renamed shard may be empty, which the resume check of size and sha256 catches.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Collects records (arrays of token ids) for one shard, then writes the tar atomically."""

    def __init__(self, directory: Path, split: str, index: int, dtype: np.dtype):
        self.path = Path(directory) / shard_name(split, index)
        self.split, self.dtype = split, np.dtype(dtype)
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.USTAR_FORMAT)
        self.tokens = self.documents = self.records = 0

    def add_record(self, tokens: np.ndarray, documents: int) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        member = tarfile.TarInfo(f"{self.path.stem}-{self.records:06d}.{_token_field(self.dtype)}")
        member.size, member.mtime, member.mode = len(data), 0, 0o644
        self._tar.addfile(member, io.BytesIO(data))
        self.tokens += len(tokens)
        self.documents += documents
        self.records += 1

    def finish(self) -> ShardInfo:
        self._tar.close()
        data = self._buffer.getvalue()
        write_atomic(self.path, data)
        return ShardInfo(self.path.name, self.split, self.tokens, self.documents, self.records, len(data),
                         hashlib.sha256(data).hexdigest())


def iter_records(data: bytes, source: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tokens) of every record in tar bytes, through WebDataset's tar reader."""
    from webdataset.tariterators import group_by_keys, tar_file_expander  # imports torch: readers only

    files = tar_file_expander([{"url": source, "stream": io.BytesIO(data)}])
    for sample in group_by_keys(files):
        for field, dtype in (("tokens.u16", "<u2"), ("tokens.u32", "<u4")):
            if field in sample:
                yield sample["__key__"], np.frombuffer(sample[field], dtype=dtype)
                break
        else:
            raise CorruptShardError(f"shard {source}: record {sample['__key__']} has no tokens.u16/u32 member")


def read_shard(directory: Path, info: ShardInfo, verify: bool = True) -> np.ndarray:
    """All tokens of one shard in order, checked against its manifest entry.

    Raises CorruptShardError (missing, truncated, wrong checksum, unreadable tar,
    wrong token count); never hangs: it is a local read of one file.
    """
    path = Path(directory) / info.name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptShardError(f"shard {path} cannot be read ({e.strerror or e})") from None
    if len(data) != info.bytes:
        raise CorruptShardError(f"shard {path} has {len(data)} bytes, the manifest says {info.bytes} "
                                "(truncated or overwritten)")
    if verify and hashlib.sha256(data).hexdigest() != info.sha256:
        raise CorruptShardError(f"shard {path} does not match its sha256 in the manifest (corrupt)")
    try:
        parts = [tokens for _, tokens in iter_records(data, str(path))]
    except CorruptShardError:
        raise
    except Exception as e:  # tarfile.ReadError, ValueError from a damaged header, ...
        raise CorruptShardError(f"shard {path} is not a readable tar ({type(e).__name__}: {e})") from None
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    if len(tokens) != info.tokens:
        raise CorruptShardError(f"shard {path} holds {len(tokens)} tokens, the manifest says {info.tokens}")
    return tokens


@dataclass
class Manifest:
    directory: Path
    data: dict                     # the JSON content
    shards: list[ShardInfo]

    @property
    def vocab_size(self) -> int:
        return int(self.data["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.data["eos_id"])

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / self.data["tokenizer"]["file"]

    def split(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def digest(self, split: str) -> str:
        """Identifies the shard set of a split (names and checksums): a resumed loader must see the same."""
        text = "\n".join(f"{s.name} {s.sha256}" for s in self.split(split))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_to_json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def shard_dicts(shards: list[ShardInfo]) -> list[dict]:
    return [asdict(s) for s in shards]


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        hint = " (a shard job is unfinished there: re-run data_prep/shard.py to complete it)" \
            if any(directory.glob("*.tar")) else ""
        raise DataError(f"no {MANIFEST_NAME} in {directory}{hint}; make shards with data_prep/shard.py "
                        "and point data.shards at its --output")
    try:
        data = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in data["shards"]]
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {MANIFEST_VERSION}")
        for key in ("vocab_size", "eos_id"):
            int(data[key])
        str(data["tokenizer"]["file"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a DIMBA shard manifest ({type(e).__name__}: {e}); "
                        "re-create it with data_prep/shard.py") from None
    for s in shards:
        if s.split not in SPLITS:
            raise DataError(f"{path}: shard {s.name} has split {s.split!r}, expected one of {SPLITS}")
    return Manifest(directory, data, shards)


def unigram_log_probs(directory: str | Path, vocab_size: int, pad_id: int, split: str = "train",
                      max_tokens: int = 50_000_000) -> np.ndarray | None:
    """log p(w) (vocab_size,) float64 from the token counts of `split`, add-0.5 smoothed, padding -inf (it is
    never a token of the data); None if the split has no shard. Reads shards in manifest order, stopping after
    the first one that reaches `max_tokens` (the same shards give the same numbers)."""
    manifest = read_manifest(directory)
    infos = manifest.split(split)
    if not infos:
        return None
    counts = np.zeros(vocab_size, dtype=np.float64)
    seen = 0
    for info in infos:
        tokens = read_shard(manifest.directory, info).astype(np.int64)
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise DataError(f"shards {directory} hold token id {int(tokens.max())}, outside the model's vocabulary "
                            f"of {vocab_size}; shard the text with the model's tokenizer")
        counts += np.bincount(tokens, minlength=vocab_size)
        seen += len(tokens)
        if seen >= max_tokens:
            break
    counts += 0.5
    counts[pad_id] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())
