"""The token stream of a split, tokenized once and memory-mapped from then on.

`cache_dir/KEY.bin` holds the ids (eos between documents); `cache_dir/KEY.json` says its dtype
and length. The sidecar is written last, so a run killed mid-write leaves no cache entry.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stagewise.data.tokenizers import eos_id
from stagewise.errors import WriteFailed

# Documents are tokenized in batches of about this many characters: large enough for
# encode_batch's threads, small enough that one batch's ids stay a modest amount of memory.
BATCH_CHARS = 4 << 20


def token_array(texts: list[str], tok: Tokenizer, cache_dir: Path, key: str) -> np.ndarray:
    """The ids of `texts` joined by eos, as a read-only memmap. `key` must change whenever the
    texts or the tokenizer do (the caller passes a fingerprint of both)."""
    cached = open_token_array(cache_dir, key)
    if cached is not None:
        return cached
    try:
        _write(texts, tok, cache_dir / f"{key}.bin", cache_dir / f"{key}.json")
    except OSError as e:  # a full disk: the entry is not written (the sidecar comes last)
        raise WriteFailed(cache_dir / f"{key}.bin", e) from None
    written = open_token_array(cache_dir, key)
    assert written is not None
    return written


def open_token_array(cache_dir: Path, key: str) -> np.ndarray | None:
    """The complete cache entry `key` as a read-only memmap, or None when there is none."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise ValueError(f"cache key {key!r} is not a plain file name")
    data, sidecar = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    meta = _cached(data, sidecar)
    return None if meta is None else np.memmap(data, dtype=meta["dtype"], mode="r", shape=(meta["length"],))


def _cached(data: Path, sidecar: Path) -> dict | None:
    """The sidecar of a complete cache entry, or None."""
    try:
        meta = json.loads(sidecar.read_text())
        complete = data.stat().st_size == meta["length"] * np.dtype(meta["dtype"]).itemsize
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def _write(texts: list[str], tok: Tokenizer, data: Path, sidecar: Path) -> dict:
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32)
    eos = np.array([eos_id(tok)], dtype=dtype)
    data.parent.mkdir(parents=True, exist_ok=True)
    length = documents = 0
    with tempfile.NamedTemporaryFile(dir=data.parent, prefix=f".{data.name}.", delete=False) as f:
        try:
            for batch in _batches(texts):
                parts = []
                # encode_batch_fast: encode_batch without the offsets, which are not needed here.
                for encoding in tok.encode_batch_fast(batch, add_special_tokens=False):
                    if documents:  # eos between documents, not before the first
                        parts.append(eos)
                    parts.append(np.asarray(encoding.ids, dtype=dtype))
                    documents += 1
                chunk = np.concatenate(parts)
                chunk.tofile(f)
                length += len(chunk)
        except BaseException:
            os.unlink(f.name)
            raise
    if length == 0:
        os.unlink(f.name)
        raise ValueError(f"{len(texts)} documents hold no tokens")
    os.replace(f.name, data)
    meta = {"dtype": dtype.name, "length": length, "documents": len(texts)}
    _write_atomically(sidecar, json.dumps(meta))
    return meta


def _batches(texts: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)
