"""Pre-tokenized data: a plan's `data` may point at token files already made, read in place.

- `.bin`: raw ids of `data.dtype` (nanoGPT's `train.bin` / `val.bin`: uint16). nanoGPT's
  `meta.pkl` is never read (unpickling runs code): the plan states the vocabulary instead
  (`tokenizer: {kind: ids, vocab_size: N}`, or the tokenizer that made the ids).
- `.npy`: a 1-D array of integer ids, read by `np.load(allow_pickle=False)`.
- a folder: its `.bin` and `.npy` files in sorted order (shards).

The files of a split are read as one stream (data.token_shards), memory-mapped. Every file is
checked in one pass of bounded memory, which also hashes its ids into the data's fingerprint: it
must hold ids (not be empty, a whole number of them, of an integer type), and every id must be
below the vocabulary size. A problem is one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data.sources import resolve_sources
from stagewise.data.token_shards import ShardedTokens
from stagewise.data.tokenizers import build_tokenizer
from stagewise.errors import UserError

SUFFIXES = (".bin", ".npy")
CHECK_IDS = 1 << 24  # ids checked (and hashed) at a time


def is_token_data(cfg: DataConfig, plan_dir: Path) -> bool:
    """Whether the plan's data is token files (format tokens, or auto and every train path ends in
    .bin or .npy, or names a folder)."""
    if cfg.format != "auto" or cfg.train is None:
        return cfg.format == "tokens"
    patterns = [cfg.train] if isinstance(cfg.train, str) else cfg.train
    return all(p.lower().endswith(SUFFIXES) or (plan_dir / p).expanduser().is_dir() for p in patterns)


def token_streams(cfg: DataConfig, tok_cfg: TokenizerConfig, plan_dir: Path,
                  tokenizer: Tokenizer | None) -> tuple[Tokenizer, ShardedTokens, ShardedTokens, str]:
    """(tokenizer, train, val, fingerprint) of token files (ids below the tokenizer's vocabulary,
    or kind ids' vocab_size); `tokenizer`: the one
    given (a mixture's), else the plan's, which cannot be one trained on text."""
    if tokenizer is None:
        if tok_cfg.kind in ("char", "bpe", "word"):
            raise UserError("tokenizer.kind", f"'{tok_cfg.kind}' is learnt from text, and the data is token files: "
                                              "give the tokenizer that made them (kind: pretrained with its path, or "
                                              "byte), or kind: ids with vocab_size (nanoGPT's meta.pkl holds it; "
                                              "stagewise never unpickles it)")
        tokenizer = build_tokenizer(tok_cfg, [], plan_dir)
    bound = tok_cfg.vocab_size if tok_cfg.kind == "ids" and tok_cfg.vocab_size else tokenizer.get_vocab_size()
    dtype = np.dtype(cfg.dtype)
    digest = hashlib.sha256(json.dumps(["tokens", cfg.dtype, cfg.val_fraction if cfg.val is None else None,
                                        hashlib.sha256(tokenizer.to_str().encode()).hexdigest()]).encode())
    train = _stream(cfg.train, "data.train", plan_dir, dtype, bound, digest)  # type: ignore[arg-type]
    if cfg.val is not None:
        val = _stream(cfg.val, "data.val", plan_dir, dtype, bound, digest)
    else:
        cut = int(len(train) * (1 - cfg.val_fraction))  # the last val_fraction of the ids, as nanoGPT splits text
        if cut == 0 or cut == len(train):
            raise UserError("data.val_fraction", f"too few ids ({len(train)}) to hold out {cfg.val_fraction} of them")
        train, val = train.window(0, cut), train.window(cut, len(train))
    return tokenizer, train, val, digest.hexdigest()


def _stream(patterns: str | list[str], where: str, plan_dir: Path, dtype: np.dtype, bound: int,
            digest: hashlib._Hash) -> ShardedTokens:
    files: list[Path] = []
    for source in resolve_sources(patterns, plan_dir, where, folders=True):
        if isinstance(source, str):
            raise UserError(where, f"'{source}': token files are local files, not a hub dataset")
        if not source.is_dir():
            files.append(source)
            continue
        shards = sorted(p for p in source.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not shards:
            raise UserError(where, f"no .bin or .npy file in the folder '{source}'")
        files.extend(shards)
    parts = [_checked(path, dtype, bound, digest) for path in files]
    if len({part.dtype for part in parts}) > 1:
        raise UserError(where, "the files hold ids of different types: "
                               + ", ".join(f"{p.name} {a.dtype}" for p, a in zip(files, parts, strict=True)))
    return ShardedTokens(parts)


def _checked(path: Path, dtype: np.dtype, bound: int, digest: hashlib._Hash) -> np.ndarray:
    """The file's ids, memory-mapped, after the checks; their bytes go into `digest`."""
    ids = _open(path, dtype)
    digest.update(f"{path.suffix}\0{ids.dtype.str}\0{len(ids)}".encode())
    for start in range(0, len(ids), CHECK_IDS):
        chunk = ids[start:start + CHECK_IDS]
        digest.update(np.ascontiguousarray(chunk).data)
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= bound:
            at = start + int(np.argmax((chunk < 0) | (chunk >= bound)))
            raise UserError(str(path), f"id {int(ids[at])} at position {at} is outside the vocabulary "
                                       f"(0..{bound - 1}): set the tokenizer that made the ids, or its vocab_size")
    return ids


def _open(path: Path, dtype: np.dtype) -> np.ndarray:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(str(path), f"cannot read: {e.strerror}") from None
    if path.suffix.lower() == ".npy":
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # not an .npy file, or an array of objects
            raise UserError(str(path), f"cannot read as .npy: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise UserError(str(path), f"a {ids.ndim}-D array of {ids.dtype}: token files hold a 1-D array of integer ids")
        if len(ids) == 0:
            raise UserError(str(path), "no ids (an empty array)")
        return ids
    if size == 0:
        raise UserError(str(path), "empty file")
    if size % dtype.itemsize:
        raise UserError(str(path), f"{size} bytes: not a whole number of {dtype.name} ids ({dtype.itemsize} bytes each); "
                                   "set data.dtype to the type the file was written with")
    return np.memmap(path, dtype=dtype, mode="r")
