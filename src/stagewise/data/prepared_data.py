"""From the plan's `data` and `tokenizer` to memory-mapped train/val token streams.

Everything slow is cached under `cache_root`, keyed by content, so a second run with the same
files and tokenizer neither retrains the tokenizer nor retokenizes:
  datasets/    the `datasets` library's downloads of `hub:` datasets
  tokenizers/  trained BPE tokenizers, by corpus fingerprint and vocab size
  tokens/      token streams, by corpus and tokenizer fingerprint
  prepared/    for local files: their raw bytes + the tokenizer settings -> the prepared entry, so
               a warm start opens the token streams without parsing (or importing `datasets`)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data.cache import open_token_array, token_array
from stagewise.data.documents import Scan
from stagewise.data.encoding import processes
from stagewise.data.sources import Corpus, data_file_keys, load_corpus, source_digest
from stagewise.data.token_files import is_token_data, token_streams
from stagewise.data.token_shards import Tokens
from stagewise.data.tokenizers import build_tokenizer
from stagewise.errors import WriteFailed

# The most training text a BPE tokenizer learns from: its merges settle long before this, and its
# trainer's memory grows with the distinct words it sees.
BPE_SAMPLE_CHARS = 64 << 20


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train: Tokens  # token ids, eos between documents (a read-only memmap, or shards read as one)
    val: Tokens
    fingerprint: str  # of the corpus and the tokenizer
    vocab_size: int


def prepare_data(data: DataConfig, tok_cfg: TokenizerConfig, plan_dir: Path,
                 cache_root: Path, *, seed: int, corpus: Corpus | None = None,
                 tokenizer: Tokenizer | None = None) -> PreparedData:
    """`seed` draws the validation rows of a table without `data.val` (data.sources). `corpus`:
    the texts, when a task reads the files (tasks.spec.TaskSpec.plan_corpus); else `data.field`
    of the files is read as text. `tokenizer`: encode with it (the plan's, for a stage's own
    text: data.mixture) instead of building one from `tok_cfg`. Token files already made are read in
    place (data.token_files)."""
    if corpus is None and is_token_data(data, plan_dir):
        with data_file_keys(data, plan_dir):
            tok, train, val, fingerprint = token_streams(data, tok_cfg, plan_dir, tokenizer)
        return PreparedData(tokenizer=tok, train=train, val=val, fingerprint=fingerprint,
                            vocab_size=tok.get_vocab_size())
    scans: dict[Path, Scan] = {}  # each local file is read once before it is encoded
    with data_file_keys(data, plan_dir):
        entry = _entry_path(data, tok_cfg, plan_dir, cache_root, seed, tokenizer, scans) if corpus is None else None
    if entry is not None and (warm := _open_entry(entry, cache_root / "tokens")) is not None:
        return warm
    if corpus is None:
        corpus = load_corpus(data, plan_dir, seed=seed, cache_dir=cache_root / "datasets", scans=scans)
    with data_file_keys(data, plan_dir):  # text files are read (and found wanting) from here on too
        tok = tokenizer if tokenizer is not None else _tokenizer(tok_cfg, corpus, plan_dir, cache_root / "tokenizers")
        fingerprint = hashlib.sha256(
            f"{corpus.fingerprint}\0{hashlib.sha256(tok.to_str().encode()).hexdigest()}".encode()
        ).hexdigest()
        tokens, num_proc = cache_root / "tokens", processes(data.num_proc)
        prepared = PreparedData(
            tokenizer=tok,
            train=token_array(corpus.train, tok, tokens, f"{fingerprint}-train", num_proc),
            val=token_array(corpus.val, tok, tokens, f"{fingerprint}-val", num_proc),
            fingerprint=fingerprint,
            vocab_size=tok.get_vocab_size(),
        )
    if entry is not None:
        _write_atomically(entry, json.dumps({"fingerprint": fingerprint, "tokenizer": tok.to_str()}))
    return prepared


def _entry_path(data: DataConfig, tok_cfg: TokenizerConfig, plan_dir: Path, cache_root: Path,
                seed: int, tokenizer: Tokenizer | None, scans: dict[Path, Scan]) -> Path | None:
    """Where the prepared entry of these files and tokenizer settings (or given tokenizer) lives;
    None when the inputs cannot be hashed as bytes (hub data, a tokenizer directory that may change)."""
    if tokenizer is None and tok_cfg.kind == "pretrained":
        return None
    source = source_digest(data, plan_dir, seed=seed, scans=scans)
    if source is None:
        return None
    tok_id = tok_cfg.model_dump_json() if tokenizer is None else hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    key = hashlib.sha256(f"{source}\0{tok_id}".encode()).hexdigest()
    return cache_root / "prepared" / f"{key}.json"


def _open_entry(entry: Path, tokens: Path) -> PreparedData | None:
    try:
        meta = json.loads(entry.read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(meta["tokenizer"])
    except Exception:  # noqa: BLE001 - a damaged entry (tokenizers raises bare Exception): use the files
        return None
    train = open_token_array(tokens, f"{meta['fingerprint']}-train")
    val = open_token_array(tokens, f"{meta['fingerprint']}-val")
    if train is None or val is None:
        return None
    return PreparedData(tokenizer=tok, train=train, val=val, fingerprint=meta["fingerprint"],
                        vocab_size=tok.get_vocab_size())


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            try:
                f.write(text)
            except OSError:
                os.unlink(f.name)
                raise
        os.replace(f.name, path)
    except OSError as e:
        raise WriteFailed(path, e) from None


def _tokenizer(cfg: TokenizerConfig, corpus: Corpus, plan_dir: Path, cache_dir: Path) -> Tokenizer:
    """Built from the training text; a trained BPE is reused (training is the slow part). A BPE
    learns its merges from at most BPE_SAMPLE_CHARS of the text, drawn evenly over it (its
    file name says so when that is less than the whole)."""
    if cfg.kind != "bpe":
        return build_tokenizer(cfg, corpus.train.texts(), plan_dir)
    sampled = f"-sample{BPE_SAMPLE_CHARS}" if corpus.train.chars > BPE_SAMPLE_CHARS else ""
    path = cache_dir / f"bpe-{cfg.vocab_size}-{corpus.fingerprint}{sampled}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = build_tokenizer(cfg, corpus.train.sample(BPE_SAMPLE_CHARS), plan_dir)
    _write_atomically(path, tok.to_str())  # a killed run leaves no half-written tokenizer under the real name
    return tok
