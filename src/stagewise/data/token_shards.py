"""Token streams longer than one file holds comfortably: fixed-size shards read as one array.

A cache entry of at most SHARD_BYTES of ids is one file, `KEY.bin` (the layout, and the keys,
of every entry before shards existed). A longer one is the folder `KEY.shards/` of files
`00000.bin`, `00001.bin`, ... of SHARD_BYTES each (the last one shorter), listed with their
lengths in the entry's sidecar. Shards are written as hidden temporary files, gathered into a
hidden folder that is renamed to `KEY.shards` only once every shard is complete (data.cache
writes the sidecar after that), so a killed preparation leaves no partial set.

`ShardedTokens` reads several 1-D id arrays (memmaps of shards, or pre-tokenized files) as their
concatenation: a window of the sampler that spans a boundary reads across it, so the batches
are those of the single array.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np

# The most bytes of ids in one file: 1 GiB (512 Mi ids of uint16), well under every file
# system's and object store's limit, and few enough files for a 100 GB corpus.
SHARD_BYTES = 1 << 30


class ShardedTokens:
    """1-D id arrays of one dtype, read as one: `len`, `dtype` and indexing by an array of
    positions (what data.sampler reads), without loading them."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        assert parts and len({part.dtype for part in parts}) == 1, "parts of one dtype"
        self.parts = list(parts)
        self.dtype = parts[0].dtype
        self.offsets = np.cumsum([0, *map(len, parts)])  # where each part starts; the last: the length

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        """The ids at the positions `index` (any shape), as one array of its shape."""
        flat = np.asarray(index, dtype=np.int64).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"positions {flat.min()}..{flat.max()} outside the stream's {len(self)} ids")
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, self.dtype)
        for part in np.unique(which):
            at = which == part
            out[at] = self.parts[part][flat[at] - self.offsets[part]]
        return out.reshape(np.shape(index))

    def window(self, start: int, stop: int) -> ShardedTokens:
        """Ids [start, stop) as a stream of their own (views, nothing is read)."""
        parts = []
        for part, offset in zip(self.parts, self.offsets[:-1], strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, len(part))
            if lo < hi:
                parts.append(part[lo:hi])
        return ShardedTokens(parts)


Tokens = np.ndarray | ShardedTokens  # a token stream: one array (a memmap) or several read as one


def shard_folder(data: Path) -> Path:
    """The folder of a sharded entry whose single-file name would be `data` (KEY.bin)."""
    return data.with_suffix(".shards")


def open_shards(data: Path, dtype: np.dtype, lengths: list[int]) -> ShardedTokens | None:
    """The shards of a complete sharded entry as one stream; None when a file is missing or of
    another size than its sidecar says."""
    folder = shard_folder(data)
    paths = [folder / f"{i:05d}.bin" for i in range(len(lengths))]
    try:
        if any(p.stat().st_size != n * dtype.itemsize for p, n in zip(paths, lengths, strict=True)):
            return None
    except OSError:
        return None
    return ShardedTokens([np.memmap(p, dtype=dtype, mode="r", shape=(n,)) for p, n in zip(paths, lengths, strict=True)])


class ShardWriter:
    """Ids appended to hidden temporary shard files next to `data`; `finish` moves them into
    place (one: `data` itself; several: `KEY.shards/`). Leaving the `with` block by an exception
    removes what was written."""

    def __init__(self, data: Path, dtype: np.dtype) -> None:
        self.data = data
        self.dtype = dtype
        self.shard_ids = max(1, SHARD_BYTES // dtype.itemsize)  # read now: tests make it small
        self.lengths: list[int] = []
        self.files: list[IO[bytes]] = []

    @property
    def length(self) -> int:
        return sum(self.lengths)

    def __enter__(self) -> ShardWriter:
        self._next_shard()
        return self

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.lengths[-1] == self.shard_ids:
                self._next_shard()
            part = ids[:self.shard_ids - self.lengths[-1]]
            part.tofile(self.files[-1])
            self.lengths[-1] += len(part)
            ids = ids[len(part):]

    def finish(self) -> dict[str, list[int]]:
        """Move the shards into place; what the sidecar adds for them ({} for a single file)."""
        for f in self.files:
            f.close()
        if len(self.files) == 1:
            os.replace(self.files[0].name, self.data)
            return {}
        staging = Path(tempfile.mkdtemp(dir=self.data.parent, prefix=f".{self.data.name}.shards."))
        for i, f in enumerate(self.files):
            os.replace(f.name, staging / f"{i:05d}.bin")
        folder = shard_folder(self.data)
        if folder.exists():
            # A damaged set (a shard lost or cut short), or one another process just put there (the
            # key fixes the content: the same ids): moved aside whole, so readers see one set or the other.
            old = Path(tempfile.mkdtemp(dir=self.data.parent, prefix=f".{self.data.name}.old."))
            folder.rename(old / "shards")
            shutil.rmtree(old)
        staging.rename(folder)
        return {"shards": self.lengths}

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            return
        for f in self.files:
            f.close()
            Path(f.name).unlink(missing_ok=True)

    def _next_shard(self) -> None:
        self.files.append(tempfile.NamedTemporaryFile(dir=self.data.parent, prefix=f".{self.data.name}.",
                                                      delete=False))
        self.lengths.append(0)
