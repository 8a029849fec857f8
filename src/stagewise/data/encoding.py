"""Pieces of text -> token ids, a batch at a time: in this process, or in `data.num_proc` worker
processes.

With workers, this process reads and cuts the text (data.documents) and writes the ids; batch i
is encoded by worker i % num_proc, and the ids are read back in the order the batches were sent,
so the token file is byte for byte the one a single process writes. A worker holds one batch at
a time, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple, NoReturn

import numpy as np
from tokenizers import Tokenizer

from stagewise.data.cores import omp_threads, physical_cores
from stagewise.data.documents import Piece
from stagewise.data.tokenizers import eos_id
from stagewise.errors import UserError

# Documents are tokenized in batches of about this many characters: large enough for
# encode_batch's threads and to pay for sending a batch to a worker, small enough that one batch's
# encodings (~100 bytes a token, in the `tokenizers` library) stay a modest amount of memory.
BATCH_CHARS = 1 << 20
# Less text than this is encoded in this process: starting the workers (a Python each, importing
# numpy and tokenizers) takes about a second, as long as encoding a few MB.
PARALLEL_MIN_CHARS = 16 << 20


class Batch(NamedTuple):
    texts: list[str]
    eos_before: list[bool]  # whether eos goes before each text (a document's first piece, but the first's)
    chars: int
    documents: int  # how many documents start in the batch


class Chunk(NamedTuple):
    ids: np.ndarray  # the batch's ids, eos included
    chars: int
    documents: int


def processes(num_proc: int | str) -> int:
    """`data.num_proc` as a count. auto: the cores `threads: auto` starts from (OMP_NUM_THREADS when
    set, else the physical cores this process may use); unlike torch's threads, not fewer when other
    processes keep cores busy: a worker that waits for a core delays only its own batches."""
    if num_proc != "auto":
        return int(num_proc)
    return omp_threads(os.environ.get("OMP_NUM_THREADS")) or physical_cores()


def encoded(pieces: Iterable[Piece], tok: Tokenizer, dtype: np.dtype, num_proc: int, chars: int) -> Iterator[Chunk]:
    """The ids of `pieces` (`chars` characters in all), a batch at a time and in order, with eos
    before each document but the first; encoded by `num_proc` worker processes when there is
    enough text to pay for starting them."""
    batches = _batches(pieces)
    if num_proc <= 1 or chars < PARALLEL_MIN_CHARS:
        encode = _Encoder(tok, dtype)
        for batch in batches:
            yield Chunk(encode(batch), batch.chars, batch.documents)
        return
    yield from _in_workers(batches, tok, dtype, num_proc)


def _in_workers(batches: Iterator[Batch], tok: Tokenizer, dtype: np.dtype, num_proc: int) -> Iterator[Chunk]:
    """Batch i goes to worker i % num_proc, one batch a worker at a time: its ids are read back
    before it is sent the next (a worker blocked writing ids nobody reads could not read a batch)."""
    workers: list[_Worker] = []
    sent: deque[Batch] = deque()
    finished = False
    try:
        i = -1
        for i, batch in enumerate(batches):
            ready = None
            if i < num_proc:
                workers.append(_Worker(tok, dtype))
            else:
                done = sent.popleft()
                ready = Chunk(workers[i % num_proc].result(), done.chars, done.documents)
            workers[i % num_proc].send(batch)  # it encodes the batch while the caller writes `ready`
            sent.append(batch)
            if ready is not None:
                yield ready
        for j, done in enumerate(sent, start=i + 1):
            yield Chunk(workers[j % len(workers)].result(), done.chars, done.documents)
        finished = True
    finally:  # also when the caller stops early (an error writing)
        for worker in workers:
            worker.stop(finished)


def _batches(pieces: Iterable[Piece]) -> Iterator[Batch]:
    texts: list[str] = []
    eos_before: list[bool] = []
    size = starts = seen = 0
    for piece in pieces:
        texts.append(piece.text)
        eos_before.append(piece.starts_document and seen > 0)
        size += len(piece.text)
        starts += piece.starts_document
        seen += piece.starts_document
        if size >= BATCH_CHARS:
            yield Batch(texts, eos_before, size, starts)
            texts, eos_before, size, starts = [], [], 0, 0
    if texts:
        yield Batch(texts, eos_before, size, starts)


class _Encoder:
    def __init__(self, tok: Tokenizer, dtype: np.dtype) -> None:
        self.tok, self.dtype = tok, dtype
        self.eos = np.array([eos_id(tok)], dtype=dtype)

    def __call__(self, batch: Batch) -> np.ndarray:
        # encode_batch_fast: encode_batch without the offsets, which are not needed here.
        encodings = self.tok.encode_batch_fast(batch.texts, add_special_tokens=False)
        parts = []
        for eos_before, encoding in zip(batch.eos_before, encodings, strict=True):
            if eos_before:
                parts.append(self.eos)
            parts.append(np.asarray(encoding.ids, dtype=self.dtype))
        return np.concatenate(parts)


class _Worker:
    """A process running `serve`: sent batches, it sends back their ids (raw bytes both ways, no
    pickles). In a session of its own, so that Ctrl-C reaches only this process, which stops it."""

    def __init__(self, tok: Tokenizer, dtype: np.dtype) -> None:
        root = str(Path(__file__).resolve().parents[2])  # where this `stagewise` is imported from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               # The workers are the parallelism: each encodes on one thread, so that they do not contend.
               "TOKENIZERS_PARALLELISM": "false"}
        self.dtype = dtype
        self.proc = subprocess.Popen([sys.executable, "-c", "from stagewise.data.encoding import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        tok_json = tok.to_str().encode()
        self._write(struct.pack("<Q", len(tok_json)) + tok_json + dtype.str.encode().ljust(4))

    def send(self, batch: Batch) -> None:
        data = [text.encode("utf-8", "surrogatepass") for text in batch.texts]
        lengths = np.fromiter(map(len, data), dtype=np.uint64, count=len(data))
        flags = np.array(batch.eos_before, dtype=np.uint8)
        self._write(b"".join([struct.pack("<Q", len(data)), lengths.tobytes(), flags.tobytes(), *data]))

    def result(self) -> np.ndarray:
        assert self.proc.stdout is not None
        (n,) = struct.unpack("<Q", _read(self.proc.stdout, 8) or self._died())
        return np.frombuffer(_read(self.proc.stdout, n * self.dtype.itemsize) or self._died(), dtype=self.dtype)

    def stop(self, finished: bool) -> None:
        """Finished: the worker ends at the end of its input; else it is killed mid-batch."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if not finished:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._died()

    def _died(self) -> NoReturn:
        code = self.proc.wait()
        raise UserError("data.num_proc", f"a process encoding the data stopped (exit code {code}; out of "
                                         "memory?): set data.num_proc lower")


def _read(stream: IO[bytes], size: int) -> bytes:
    """`size` bytes of `stream`, or b"" when it ends first."""
    data = stream.read(size)
    return data if len(data) == size else b""


def serve() -> None:
    """A worker process (_Worker): the tokenizer and the ids' type, then batches until the input
    ends, each answered with its ids."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        (size,) = struct.unpack("<Q", stdin.read(8))
        encode = _Encoder(Tokenizer.from_str(stdin.read(size).decode()), np.dtype(stdin.read(4).decode().strip()))
        while header := _read(stdin, 8):
            (n,) = struct.unpack("<Q", header)
            lengths = np.frombuffer(_read(stdin, 8 * n), dtype=np.uint64)
            flags = _read(stdin, n)
            payload = _read(stdin, int(lengths.sum()))
            ends = np.cumsum(lengths).tolist()
            texts = [payload[a:b].decode("utf-8", "surrogatepass") for a, b in zip([0, *ends[:-1]], ends, strict=True)]
            ids = encode(Batch(texts, [bool(f) for f in flags], 0, 0))
            stdout.write(struct.pack("<Q", len(ids)) + ids.tobytes())
            stdout.flush()
    except (BrokenPipeError, struct.error):  # the preparing process has gone: so does its worker
        pass
