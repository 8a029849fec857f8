"""A split's documents as a stream of bounded pieces: what the tokenizer is built from and the token
cache is written from, in memory that does not grow with the corpus.

A document (a text file, a table row, a hub record) is handed out in pieces of at most about
PIECE_CHARS characters (the `tokenizers` library needs ~1.5 KB per character of a text while it
encodes it, and encodes 1-2 Ki-character texts 1.7x faster than 16 Ki ones), cut only where a byte-level BPE's pre-tokenizer (GPT-2's
split), a char tokenizer and a sentencepiece-style one with a leading space all cut the text
anyway: before a space that follows a printable ASCII character and precedes an ASCII letter
(`a| b`), else after a line break between two other characters (`a\n|b`), else between an
ASCII letter and ASCII punctuation (`a|+b`, in long runs of code or base64). So the ids of the
pieces joined are the ids of the whole document (token_array checks that a tokenizer does so
before relying on it). A stretch of more than MAX_STRETCH characters with no such place (a 1 GB
line of one word) is a one-line error naming the file and line.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

from stagewise.errors import UserError

PIECE_CHARS = 2 << 10
MAX_STRETCH = 256 << 10  # characters: the longest stretch of a document without a place to cut it
# The longest document given whole to a tokenizer that cannot encode one in pieces (cache.splits_cleanly).
MAX_DOCUMENT = 64 << 20
READ_BYTES = 4 << 20  # a text file is read (hashed, checked, counted, split) in chunks of this size
_BREAKS = (re.compile(r"(?<=[!-~]) (?=[A-Za-z])"), re.compile(r"(?<=[^\s]\n)(?=[^\s])"),
           re.compile(r"(?<=[A-Za-z])(?=[!-/:-@\[-`{-~])"))


class Piece(NamedTuple):
    text: str
    starts_document: bool  # the first piece of a document (eos goes before it in a token stream)
    where: str  # the file (and line) it comes from, for an error about it


@dataclass(frozen=True)
class TextFile:
    """Characters [start, stop) of a UTF-8 text file, one document, read with universal newlines
    (as `Path.read_text` reads it)."""

    path: Path
    start: int
    stop: int

    @property
    def chars(self) -> int:
        return self.stop - self.start

    def pieces(self) -> Iterator[Piece]:
        where = str(self.path)
        with self.path.open(encoding="utf-8") as f:
            skip, line = self.start, 1
            while skip > 0:  # the text before `start` (a val split's tail): read past it
                skipped = f.read(min(skip, READ_BYTES))
                skip -= len(skipped)
                line += skipped.count("\n")
            for i, text in enumerate(cut(self._chunks(f), where, line)):
                yield Piece(text, i == 0, where)

    def split(self, at: int) -> tuple[list[Part], list[Part]]:
        """The first `at` characters and the rest (an empty side is left out)."""
        middle = self.start + at
        return ([TextFile(self.path, self.start, middle)] if at > 0 else [],
                [TextFile(self.path, middle, self.stop)] if middle < self.stop else [])

    def _chunks(self, f: TextIO) -> Iterator[str]:
        left = self.chars
        while left > 0 and (chunk := f.read(min(left, READ_BYTES))):
            left -= len(chunk)
            yield chunk


@dataclass(frozen=True)
class Texts:
    """Documents held in memory (table rows, parquet and hub records, a task's texts)."""

    documents: list[str]
    where: str

    @property
    def chars(self) -> int:
        return sum(map(len, self.documents))

    def pieces(self) -> Iterator[Piece]:
        for doc in self.documents:
            for i, text in enumerate(cut([doc], self.where) if doc else [""]):  # an empty document is one
                yield Piece(text, i == 0, self.where)

    def split(self, at: int) -> tuple[list[Part], list[Part]]:
        """The documents before character `at` and the rest; the document `at` falls in is cut in
        two (an empty half is left out: nanoGPT's split of the last characters)."""
        head: list[str] = []
        for i, doc in enumerate(self.documents):
            if at <= len(doc):
                before, after = doc[:at], doc[at:]
                return ([Texts([*head, *([before] if before else [])], self.where)],
                        [Texts([*([after] if after else []), *self.documents[i + 1:]], self.where)])
            head.append(doc)
            at -= len(doc)
        raise AssertionError("unreachable: the caller cuts inside the documents")


Part = TextFile | Texts


@dataclass(frozen=True)
class Documents:
    """A split: parts in order, each starting a document."""

    parts: tuple[Part, ...]

    @classmethod
    def of(cls, texts: list[str], where: str = "") -> Documents:
        return cls((Texts(texts, where),))

    @property
    def chars(self) -> int:
        return sum(part.chars for part in self.parts)

    def __len__(self) -> int:
        """How many documents."""
        return sum(1 if isinstance(part, TextFile) else len(part.documents) for part in self.parts)

    def pieces(self) -> Iterator[Piece]:
        for part in self.parts:
            yield from part.pieces()

    def texts(self) -> Iterator[str]:
        return (piece.text for piece in self.pieces())

    def documents(self) -> Iterator[str]:
        """Each document whole (up to MAX_DOCUMENT characters)."""
        return (piece.text for piece in whole(self.pieces()))

    def sample(self, chars: int) -> Iterator[str]:
        """About `chars` characters drawn evenly over the split: the pieces that hold one of
        chars // PIECE_CHARS evenly spaced points (every piece when the split is no longer)."""
        total = self.chars
        if total <= chars:
            yield from self.texts()
            return
        points = max(1, chars // PIECE_CHARS)

        def before(x: int) -> int:  # how many of the points (k + 1/2) * total / points lie below x
            return min(points, max(0, -(-(2 * x * points - total) // (2 * total))))

        offset = 0
        for text in self.texts():
            end = offset + len(text)
            if before(end) > before(offset):
                yield text
            offset = end

    def split_at(self, at: int) -> tuple[Documents, Documents]:
        """(the first `at` characters, the rest), cut as nanoGPT cuts its text: the part (and
        document) that holds the cut is cut in two. 0 < at < chars."""
        head: list[Part] = []
        for i, part in enumerate(self.parts):
            if at <= part.chars:
                before, after = part.split(at)
                return Documents((*head, *before)), Documents((*after, *self.parts[i + 1:]))
            head.append(part)
            at -= part.chars
        raise AssertionError("unreachable: 0 < at < chars")


def cut(chunks: Iterator[str] | list[str], where: str, line: int = 1) -> Iterator[str]:
    """The text of `chunks` (one document, from line `line` of `where`) in pieces of about
    PIECE_CHARS, cut at _BREAKS."""
    buffer, at = "", 0  # the text read and not handed out yet is buffer[at:]
    for chunk in chunks:
        buffer, at = buffer[at:] + chunk, 0
        while len(buffer) - at >= PIECE_CHARS:
            found = _break(buffer, at)
            if found is None:
                if len(buffer) - at > MAX_STRETCH:
                    raise UserError(f"{where}:{line}", f"more than {MAX_STRETCH >> 10} Ki characters without "
                                                            "a space between words or a line break (the most "
                                                            "stagewise encodes at once): break the text into lines")
                break
            piece, at = buffer[at:found], found
            line += piece.count("\n")
            yield piece
    if at < len(buffer):
        yield buffer[at:]


def _break(text: str, at: int) -> int | None:
    """A place to cut text[at:]: the first in the second half of its first PIECE_CHARS, else the
    first anywhere; None when there is none."""
    for start, stop in ((at + PIECE_CHARS // 2, at + PIECE_CHARS), (at + 1, at + PIECE_CHARS),
                        (at + PIECE_CHARS, len(text))):
        for pattern in _BREAKS:
            found = pattern.search(text, start, stop)
            if found is not None:
                return found.start()
    return None


def whole(pieces: Iterator[Piece]) -> Iterator[Piece]:
    """The pieces of each document joined into one, up to MAX_DOCUMENT characters."""
    joined: list[Piece] = []
    size = 0
    for piece in pieces:
        if piece.starts_document and joined:
            yield Piece("".join(p.text for p in joined), True, joined[0].where)
            joined, size = [], 0
        joined.append(piece)
        size += len(piece.text)
        if size > MAX_DOCUMENT:
            raise UserError(piece.where, f"a document of more than {MAX_DOCUMENT >> 20} Mi characters, and the "
                                         "tokenizer encodes a text's start apart from the rest (it cannot be "
                                         "encoded in pieces): split the file into smaller documents")
    if joined:
        yield Piece("".join(p.text for p in joined), True, joined[0].where)


@dataclass(frozen=True)
class Scan:
    digest: bytes  # sha256 of the byte length (8 bytes, little-endian) and the bytes
    size: int  # bytes
    chars: int  # characters as read with universal newlines (0 without a check)

    @property
    def empty(self) -> bool:
        return self.size == 0


def not_utf8(data: bytes, base: int, e: UnicodeDecodeError) -> str:
    """What a byte that is not UTF-8 says (`data` read from file offset `base`), and what the file
    is instead when its start looks like UTF-16 (Windows' "Unicode": a byte-order mark, or ASCII
    text with a zero byte after or before each character)."""
    message = f"not UTF-8: byte 0x{data[e.start]:02x} at offset {base + e.start} ({e.reason})"
    head = data[:64] if base == 0 else b""
    halves = (head[0::2], head[1::2])
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) >= 8 and any(h.count(0) >= 0.75 * len(h) for h in halves)):
        message += "; it looks like UTF-16: save it as UTF-8"
    return message


def scan_text(path: Path, check: Callable[[bytes, int, UnicodeDecodeError], UserError] | None = None) -> Scan:
    """One pass over a file's bytes: their digest, and (with `check`) the characters it holds as
    UTF-8 text with universal newlines; a byte that is not UTF-8 raises `check(bytes, offset, error)`."""
    h = hashlib.sha256()
    chars = crlf = 0
    pending = b""  # the start of a character cut by the chunk's end
    base = 0  # the file offset of `pending`'s first byte
    last = ""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        while True:
            chunk = f.read(READ_BYTES)
            h.update(chunk)
            if check is None:
                if not chunk:
                    break
                continue
            data = pending + chunk
            try:
                text = data.decode("utf-8")
                pending = b""
            except UnicodeDecodeError as e:
                if chunk and e.reason == "unexpected end of data" and e.end == len(data):
                    text, pending = data[:e.start].decode("utf-8"), data[e.start:]
                else:
                    raise check(data, base, e) from None
            base += len(data) - len(pending)
            chars += len(text)
            crlf += text.count("\r\n") + (last == "\r" and text.startswith("\n"))
            last = text[-1:] or last
            if not chunk:
                break
    return Scan(h.digest(), size, chars - crlf)

