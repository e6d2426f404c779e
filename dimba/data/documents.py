"""Documents from input files: plain text or JSONL, optionally gzip-compressed.

Text files hold one document per blank-line-separated block (`text_mode="blocks"`,
paragraphs for book-like text) or one per line (`text_mode="lines"`). JSONL files
hold one JSON object per line with the text under `text_key`.

Bad input is never dropped silently and never a traceback: a missing file or an
empty glob is a `DataError` (nothing to do until a person fixes the command);
everything else is counted in `InputStats` and reported with file:line, and the
counts go into the shard manifest:
  undecodable_lines  bytes that are not UTF-8 (replaced by U+FFFD, document kept)
  empty_files        a file with no documents
  unreadable_files   a truncated or corrupt .gz (documents read before the damage are kept)
  jsonl_invalid      a JSONL line that is not a JSON object (line skipped)
  jsonl_missing_key  a JSONL object without `text_key` (line skipped)
  jsonl_not_string   `text_key` holds something other than a string (line skipped)
  empty_documents    a JSONL text that is empty or whitespace only (line skipped)
A file that is mostly not text (binary data, UTF-16, ...) is refused by
`check_text_files` before anything is read: counting its bytes as undecodable lines
would turn it into noise in the shards.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from dimba.data.errors import DataError

Format = Literal["auto", "text", "jsonl"]
TextMode = Literal["blocks", "lines"]
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
MAX_MESSAGES_PER_KIND = 5          # then one summary line per kind at the end
COUNTER_NAMES = ("undecodable_lines", "empty_files", "unreadable_files", "jsonl_invalid", "jsonl_missing_key",
                 "jsonl_not_string", "empty_documents")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class InputStats:
    """Counts of documents read and of every kind of bad input, with rate-limited messages."""
    warn: Callable[[str], None] = _stderr
    files: int = 0
    documents: int = 0
    text_chars: int = 0
    counts: dict = field(default_factory=lambda: {name: 0 for name in COUNTER_NAMES})

    def bad(self, kind: str, where: str, message: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= MAX_MESSAGES_PER_KIND:
            self.warn(f"warning: {where}: {message}")

    def summary_lines(self) -> list[str]:
        return [f"warning: {n} × {kind} in total (the first {MAX_MESSAGES_PER_KIND} are shown above)"
                for kind, n in self.counts.items() if n > MAX_MESSAGES_PER_KIND]

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "text_chars": self.text_chars, **self.counts}


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs, in the order given (each glob sorted); errors for missing ones."""
    if not patterns:
        raise DataError("no inputs given; pass text or JSONL files (or globs) with --input")
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"input glob {pattern!r} matched no files; check the pattern (quote it so the shell "
                                "does not expand it) and the directory")
            out.extend(Path(p) for p in matches)
            continue
        path = Path(pattern)
        if path.is_dir():
            raise DataError(f"input {pattern} is a directory; pass its files, e.g. '{pattern}/*.txt'")
        if not path.is_file():
            raise DataError(f"input file {pattern} not found; check the path")
        out.append(path)
    seen: set[Path] = set()
    for path in out:
        key = path.resolve()
        if key in seen:
            raise DataError(f"input file {path} is given twice; each file may appear once")
        seen.add(key)
    return out


def input_format(path: Path, fmt: Format = "auto") -> Literal["text", "jsonl"]:
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


SNIFF_BYTES = 1 << 16              # how much of each file `check_text_files` looks at
MAX_NOT_TEXT = 0.3                 # ... and the share of those bytes that are not text above which it refuses the file
# bytes that are not text once decoded with surrogateescape: C0 controls but tab, newline, CR and form feed,
# DEL, and invalid UTF-8 (each such byte becomes one lone surrogate)
NOT_TEXT = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\udc80-\udcff]")


def not_text_bytes(data: bytes) -> int:
    """How many bytes of `data` are not UTF-8 text (a character cut at the end of a sample counts: 3 at most)."""
    return len(NOT_TEXT.findall(data.decode("utf-8", errors="surrogateescape")))


def check_text_files(paths: list[Path], fmt: Format = "auto") -> None:
    """Refuse a file whose first SNIFF_BYTES (decompressed for .gz) are mostly not UTF-8 text."""
    for path in paths:
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                data = f.read(SNIFF_BYTES)
        except (OSError, EOFError, zlib.error):
            continue                   # a corrupt .gz: reading it counts it as an unreadable file
        bad = not_text_bytes(data)
        if data and bad > MAX_NOT_TEXT * len(data):
            kind = "JSONL" if input_format(path, fmt) == "jsonl" else "text"
            raise DataError(f"input file {path} is not {kind}: {bad} of its first {len(data)} bytes are not UTF-8 "
                            "text (binary data, or another encoding such as UTF-16); remove it from --input "
                            "or convert it to UTF-8")


READ_BYTES = 1 << 20
# A run of blank lines (only whitespace; `\s` and str.strip() share Python's definition of whitespace).
BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
TRAILING_CR = re.compile(r"\r+(?=\n|\Z)")


def _decode(data: bytes, first: int, path: Path, stats: InputStats) -> str:
    """Text of complete lines numbered from `first`, CRs before newlines dropped; bytes that are
    not UTF-8 are counted per line and replaced by U+FFFD."""
    try:
        text = data.decode("utf-8")                         # the fast path: the whole chunk at once
    except UnicodeDecodeError:
        lines = []
        for i, raw in enumerate(data.split(b"\n"), first):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                stats.bad("undecodable_lines", f"{path}:{i}",
                          f"bytes that are not UTF-8 ({e.reason} at byte {e.start}); replaced by U+FFFD")
                lines.append(raw.decode("utf-8", errors="replace"))
        text = "\n".join(lines)
    return TRAILING_CR.sub("", text) if "\r" in text else text


def _text_chunks(path: Path, stats: InputStats) -> Iterator[tuple[int, str]]:
    """(number of the first line, text of whole lines without the last newline), about READ_BYTES at a time.

    A truncated or corrupt .gz is counted; the lines read before the damage are kept.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    first, parts, size = 1, [], 0
    with opener(path, "rb") as f:
        while True:
            try:
                piece = f.read1(READ_BYTES)
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                done = first - 1 + sum(p.count(b"\n") for p in parts)
                stats.bad("unreadable_files", str(path), f"corrupt or truncated gzip after line {done} ({e}); "
                                                          "the documents before it are kept")
                piece = b""
            if piece:
                parts.append(piece)
                size += len(piece)
                if size < READ_BYTES:
                    continue
                data = b"".join(parts)
                cut = data.rfind(b"\n")
                if cut < 0:                                # one very long line: keep reading
                    parts, size = [data], len(data)
                    continue
                parts = [data[cut + 1:]]                   # an unfinished line waits for the next piece
                size = len(parts[0])
                data = data[:cut]
            else:                                          # end of file (or of what could be read)
                data = b"".join(parts)
                if data.endswith(b"\n"):
                    data = data[:-1]
                elif not data:
                    return
            yield first, _decode(data, first, path, stats)
            first += data.count(b"\n") + 1
            if not piece:
                return


def _jsonl_documents(path: Path, text_key: str, stats: InputStats) -> Iterator[list[str]]:
    for first, text in _text_chunks(path, stats):
        docs = []
        for lineno, line in enumerate(text.split("\n"), first):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.bad("jsonl_invalid", where, f"not valid JSON ({e.msg}); line skipped")
                continue
            if not isinstance(obj, dict):
                stats.bad("jsonl_invalid", where, f"a JSON {type(obj).__name__}, not an object; line skipped")
                continue
            if text_key not in obj:
                keys = ", ".join(sorted(obj)[:5]) or "none"
                stats.bad("jsonl_missing_key", where, f"no key {text_key!r} (keys: {keys}); line skipped; "
                                                      "pass --text-key to read another field")
                continue
            doc = obj[text_key]
            if not isinstance(doc, str):
                stats.bad("jsonl_not_string", where, f"{text_key!r} holds a {type(doc).__name__}, not a string; "
                                                     "line skipped")
                continue
            if not doc.strip():
                stats.bad("empty_documents", where, f"{text_key!r} is empty; line skipped")
                continue
            docs.append(doc)
        yield docs


def _block_documents(path: Path, stats: InputStats) -> Iterator[list[str]]:
    """Blank-line-separated blocks, found per chunk with one regex split (the last block may go on)."""
    carry = ""
    for _, text in _text_chunks(path, stats):
        if carry:
            text = carry + "\n" + text
        pieces = BLANK_LINES.split("\n" + text + "\n")   # newlines around it: blank first/last lines match too
        carry = pieces.pop().strip("\n")
        yield [p for p in (piece.strip("\n") for piece in pieces) if p]
    if carry:
        yield [carry]


def iter_document_lists(path: Path, fmt: Format, text_mode: TextMode, text_key: str,
                        stats: InputStats) -> Iterator[list[str]]:
    """The documents of one file, in order, a list per chunk read (lists may be empty)."""
    if input_format(path, fmt) == "jsonl":
        chunks = _jsonl_documents(path, text_key, stats)
    elif text_mode == "lines":
        chunks = ([line for line in text.split("\n") if line.strip()] for _, text in _text_chunks(path, stats))
    else:
        chunks = _block_documents(path, stats)
    stats.files += 1
    count = 0
    for docs in chunks:
        count += len(docs)
        stats.documents += len(docs)
        stats.text_chars += sum(map(len, docs))
        yield docs
    if count == 0:
        stats.bad("empty_files", str(path), "holds no documents (empty or only blank lines)")


def _check_modes(fmt: str, text_mode: str) -> None:
    if text_mode not in ("blocks", "lines"):
        raise DataError(f"text mode must be 'blocks' or 'lines', got {text_mode!r}")
    if fmt not in ("auto", "text", "jsonl"):
        raise DataError(f"input format must be 'auto', 'text' or 'jsonl', got {fmt!r}")


def iter_corpus_lists(paths: list[Path], fmt: Format = "auto", text_mode: TextMode = "blocks",
                      text_key: str = "text", stats: Optional[InputStats] = None) -> Iterator[list[str]]:
    """All documents of all files in order, as lists (the fast path for the sharding job)."""
    _check_modes(fmt, text_mode)
    stats = stats if stats is not None else InputStats()
    for path in paths:
        yield from iter_document_lists(path, fmt, text_mode, text_key, stats)


def iter_documents(paths: list[Path], fmt: Format = "auto", text_mode: TextMode = "blocks", text_key: str = "text",
                   stats: Optional[InputStats] = None) -> Iterator[str]:
    """All documents of all files, in order: the order defines the global document index."""
    for docs in iter_corpus_lists(paths, fmt, text_mode, text_key, stats):
        yield from docs
