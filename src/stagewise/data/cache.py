"""The token stream of a split, tokenized once and memory-mapped from then on.

`cache_dir/KEY.bin` holds the ids (eos between documents; past data.token_shards.SHARD_BYTES, the
folder `KEY.shards/` of shards); `cache_dir/KEY.json` says its dtype and length. The ids are
written batch by batch to temporary files that are renamed when complete, and the sidecar is
written last, so a run killed mid-write leaves no cache entry (only hidden temporary files, which
the next preparation of any key in the folder removes once they are stale).
Memory stays bounded: the documents come as pieces (data.documents), encoded a batch at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stagewise.data.documents import Documents, whole
from stagewise.data.encoding import encoded
from stagewise.data.prep_progress import Progress
from stagewise.data.token_shards import ShardWriter, Tokens, open_shards
from stagewise.errors import WriteFailed


def token_array(docs: Documents, tok: Tokenizer, cache_dir: Path, key: str, num_proc: int = 1) -> Tokens:
    """The ids of `docs` joined by eos, as a read-only memmap (or, past one shard, several read as
    one: data.token_shards), encoded by `num_proc` processes (data.encoding). `key` must change
    whenever the documents or the tokenizer do (the caller passes a fingerprint of both)."""
    cached = open_token_array(cache_dir, key)
    if cached is not None:
        return cached
    try:
        _write(docs, tok, cache_dir / f"{key}.bin", cache_dir / f"{key}.json", num_proc)
    except OSError as e:  # a full disk: the entry is not written (the sidecar comes last)
        raise WriteFailed(cache_dir / f"{key}.bin", e) from None
    written = open_token_array(cache_dir, key)
    assert written is not None
    return written


def open_token_array(cache_dir: Path, key: str) -> Tokens | None:
    """The complete cache entry `key` as a read-only memmap (or shards), or None when there is none."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise ValueError(f"cache key {key!r} is not a plain file name")
    data, sidecar = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    try:
        meta = json.loads(sidecar.read_text())
        dtype, length, shards = np.dtype(meta["dtype"]), meta["length"], meta.get("shards")
        if shards is not None:
            return open_shards(data, dtype, shards) if sum(shards) == length else None
        complete = data.stat().st_size == length * dtype.itemsize
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return np.memmap(data, dtype=dtype, mode="r", shape=(length,)) if complete else None


def _write(docs: Documents, tok: Tokenizer, data: Path, sidecar: Path, num_proc: int) -> dict:
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32)
    data.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(data.parent)
    pieces = docs.pieces() if splits_cleanly(tok) else whole(docs.pieces())
    documents = 0
    with ShardWriter(data, dtype) as out, Progress(f"tokenizing {data.name}", docs.chars) as progress:
        for chunk in encoded(pieces, tok, dtype, num_proc, docs.chars):
            out.write(chunk.ids)
            documents += chunk.documents
            progress.advance(chunk.chars)
        if out.length == 0:
            raise ValueError(f"{documents} documents hold no tokens")
        meta = {"dtype": dtype.name, "length": out.length, "documents": documents, **out.finish()}
    _write_atomically(sidecar, json.dumps(meta))
    return meta


# Texts whose ids, encoded in two pieces cut where data.documents cuts (one of each place it cuts), must
# be the ids of the whole.
_PROBES = ("Hello world", "one. Two", "x1 y2", "(a) b, c; D", "it's the end", "line\nbreak", "end.\nNext", "abc+def", "x.y/z")


def splits_cleanly(tok: Tokenizer) -> bool:
    """Whether `tok` gives a document the same ids encoded in data.documents' pieces as whole: our
    own tokenizers do; a pretrained one that marks the start of every text (a sentencepiece
    normalizer that prepends its space) does not, and is given documents whole."""
    for text in _PROBES:
        at = text.index("\n") + 1 if "\n" in text else text.index(" ", 1) if " " in text else 3
        whole = tok.encode(text, add_special_tokens=False).ids
        if whole != [*tok.encode(text[:at], add_special_tokens=False).ids,
                     *tok.encode(text[at:], add_special_tokens=False).ids]:
            return False
    return True


STALE_SECONDS = 24 * 3600


def _remove_stale(folder: Path) -> None:
    """Temporary files (and shard folders) of preparations killed mid-write (a day untouched: none
    still running)."""
    now = time.time()
    for path in folder.glob(".*.bin.*"):
        try:
            if now - path.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            continue


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)
