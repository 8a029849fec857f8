"""Sharded token storage: a token stream past the shard size is a folder of fixed-size shards read
as one array, so training on it gives the batches, losses and stage keys of the single file; resume
across shards is exact; a killed preparation leaves no partial set of shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import resumes_identically, run_plan

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data import token_shards
from stagewise.data.prepared_data import prepare_data
from stagewise.data.token_shards import ShardedTokens
from stagewise.engine.verify import metrics_difference, state_difference

STAGES: list[dict[str, Any]] = [
    {"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 12, "eval": {"every": 4}},
    {"name": "b", "optimizer": {"handoff": "carry"}, "schedule": {"name": "cosine"}, "steps": 8},
]
# 1000 bytes of uint16 ids: 500 ids a shard, so the 54k-id training split of the test corpus is
# ~108 shards and a third of the 33-id windows cross a shard boundary.
TINY_SHARD = 1000


@pytest.fixture
def tiny_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_shards, "SHARD_BYTES", TINY_SHARD)


def _as_array(tokens: Any) -> np.ndarray:
    return tokens[np.arange(len(tokens))]


def test_sharded_tokens_read_as_their_concatenation() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n).astype(np.uint16) for n in (7, 1, 30, 5)]
    whole = np.concatenate(parts)
    tokens = ShardedTokens(parts)
    assert len(tokens) == len(whole) and tokens.dtype == np.uint16
    index = rng.integers(0, len(whole), (6, 9))
    assert np.array_equal(tokens[index], whole[index])
    windows = np.arange(0, len(whole) - 4, 4)[:, None] + np.arange(5)  # every boundary inside some window
    assert np.array_equal(tokens[windows], whole[windows])
    assert np.array_equal(_as_array(tokens.window(5, 40)), whole[5:40])
    with pytest.raises(IndexError, match="outside the stream's 43 ids"):
        tokens[np.array([43])]


def test_a_stream_past_the_shard_size_is_fixed_size_shards_of_the_same_ids(
        tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, tok = DataConfig(train=str(corpus)), TokenizerConfig(kind="char")
    single = prepare_data(data, tok, Path("/"), tmp_path / "single", seed=0)
    monkeypatch.setattr(token_shards, "SHARD_BYTES", TINY_SHARD)
    sharded = prepare_data(data, tok, Path("/"), tmp_path / "sharded", seed=0)
    assert sharded.fingerprint == single.fingerprint  # the cache key (and so the stage keys) is the same
    assert isinstance(single.train, np.memmap) and isinstance(sharded.train, ShardedTokens)
    assert np.array_equal(_as_array(sharded.train), single.train)
    assert np.array_equal(_as_array(sharded.val), single.val)
    tokens = tmp_path / "sharded" / "tokens"
    key = f"{single.fingerprint}-train"
    files = sorted((tokens / f"{key}.shards").iterdir())
    assert [f.name for f in files[:2]] == ["00000.bin", "00001.bin"]
    assert {f.stat().st_size for f in files[:-1]} == {TINY_SHARD} and 0 < files[-1].stat().st_size <= TINY_SHARD
    meta = json.loads((tokens / f"{key}.json").read_text())
    assert len(meta["shards"]) == len(files) and sum(meta["shards"]) == meta["length"] == len(single.train)
    assert not (tokens / f"{key}.bin").exists()
    assert (tmp_path / "single" / "tokens" / f"{key}.bin").is_file()  # under one shard: the one file of before
    assert not list((tmp_path / "single" / "tokens").glob("*.shards"))
    # a shard missing or cut short: no entry, prepared again
    files[3].write_bytes(files[3].read_bytes()[:-2])
    again = prepare_data(data, tok, Path("/"), tmp_path / "sharded", seed=0)
    assert np.array_equal(_as_array(again.train), single.train)
    assert files[3].stat().st_size == TINY_SHARD


def test_training_on_shards_logs_the_numbers_of_the_single_file(
        tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    single, single_run = run_plan(tmp_path, corpus, STAGES, "single", threads=1)
    monkeypatch.setattr(token_shards, "SHARD_BYTES", TINY_SHARD)
    sharded, sharded_run = run_plan(tmp_path, corpus, STAGES, "sharded", threads=1)
    assert list((tmp_path / "sharded-cache" / "tokens").glob("*.shards"))
    assert [s.key for s in sharded.stages] == [s.key for s in single.stages]
    assert metrics_difference(single_run, sharded_run) is None
    assert state_difference(single, sharded) is None


def test_resume_across_shards_is_bit_identical(tmp_path: Path, corpus: Path, tiny_shards: None) -> None:
    whole = resumes_identically(tmp_path, corpus, STAGES, stop_after=9, threads=1)
    assert list((tmp_path / "whole-cache" / "tokens").glob("*.shards"))
    assert list((tmp_path / "cut-cache" / "tokens").glob("*.shards"))
    assert whole.is_dir()


KILLED = """
import sys
from pathlib import Path
from stagewise.data import cache, documents, token_shards
from stagewise.data.prepared_data import prepare_data
from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
documents.PIECE_CHARS, cache.BATCH_CHARS, token_shards.SHARD_BYTES = 4096, 1 << 14, 1 << 13
prepare_data(DataConfig(train=sys.argv[1]), TokenizerConfig(kind="byte"), Path("/"), Path(sys.argv[2]), seed=0)
"""


def test_a_killed_sharded_preparation_leaves_no_shards_and_the_next_one_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "corpus.txt"
    line = "a few words of text, and then some more of them on a line\n"
    corpus.write_text(line * 20_000, encoding="utf-8")  # 1.2 MB: ~140 shards of 8 KiB
    tokens = tmp_path / "cache" / "tokens"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(corpus), str(tmp_path / "cache")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(list(tokens.glob(".*"))) < 4 if tokens.is_dir() else True:  # several shards written
        assert proc.poll() is None and time.monotonic() < deadline, "the preparation ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p for p in tokens.iterdir() if not p.name.startswith(".")] == []  # only hidden temporary files
    monkeypatch.setattr(token_shards, "SHARD_BYTES", 1 << 13)
    p = prepare_data(DataConfig(train=str(corpus)), TokenizerConfig(kind="byte"), Path("/"), tmp_path / "cache",
                     seed=0)
    assert isinstance(p.train, ShardedTokens)
    assert len(list(tokens.glob("*.shards/*.bin"))) > 100
    text = corpus.read_text(encoding="utf-8")
    at = int(len(text) * 0.9)
    assert _as_array(p.train).tolist() == p.tokenizer.encode(text[:at], add_special_tokens=False).ids
