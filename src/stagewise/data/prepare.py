"""From the plan's `data` and `tokenizer` to memory-mapped train/val token streams.

Everything slow is cached under `cache_root`, keyed by content, so a second run with the same
files and tokenizer neither retrains the tokenizer nor retokenizes:
  datasets/    the `datasets` library's downloads of `hub:` datasets
  tokenizers/  trained BPE tokenizers, by corpus fingerprint and vocab size
  tokens/      token streams, by corpus and tokenizer fingerprint
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stagewise.data.cache import token_array
from stagewise.data.sources import Corpus, load_corpus
from stagewise.data.tokenizers import build_tokenizer
from stagewise.plan.schema import DataConfig, TokenizerConfig


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train: np.ndarray  # token ids, eos between documents (read-only memmap)
    val: np.ndarray
    fingerprint: str  # of the corpus and the tokenizer
    vocab_size: int


def prepare_data(data: DataConfig, tok_cfg: TokenizerConfig, plan_dir: Path,
                 cache_root: Path) -> PreparedData:
    corpus = load_corpus(data, plan_dir, cache_dir=cache_root / "datasets")
    tok = _tokenizer(tok_cfg, corpus, plan_dir, cache_root / "tokenizers")
    fingerprint = hashlib.sha256(
        f"{corpus.fingerprint}\0{hashlib.sha256(tok.to_str().encode()).hexdigest()}".encode()
    ).hexdigest()
    tokens = cache_root / "tokens"
    return PreparedData(
        tokenizer=tok,
        train=token_array(corpus.train, tok, tokens, f"{fingerprint}-train"),
        val=token_array(corpus.val, tok, tokens, f"{fingerprint}-val"),
        fingerprint=fingerprint,
        vocab_size=tok.get_vocab_size(),
    )


def _tokenizer(cfg: TokenizerConfig, corpus: Corpus, plan_dir: Path, cache_dir: Path) -> Tokenizer:
    """Built from the training text; a trained BPE is reused (training is the slow part)."""
    if cfg.kind != "bpe":
        return build_tokenizer(cfg, corpus.train, plan_dir)
    path = cache_dir / f"bpe-{cfg.vocab_size}-{corpus.fingerprint}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = build_tokenizer(cfg, corpus.train, plan_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, prefix=f".{path.name}.", delete=False) as f:
        f.write(tok.to_str())
    os.replace(f.name, path)  # a killed run leaves no half-written tokenizer under the real name
    return tok
