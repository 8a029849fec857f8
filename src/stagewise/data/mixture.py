"""A stage's data as a weighted mixture of sources (`data: {mix: [...]}`): each source's files are
read and tokenized with the plan's tokenizer through the token cache (data.prepared_data), and its own
window sampler (data.sampler) deals its sequences in its own shuffled order.

Mixing is per sequence: every sequence of a micro-batch picks its source by the weights, so each
micro-batch (and each update) is already a sample of the mixture, not one source at a time (that
would make updates alternate between distributions, with the variance of a batch from one source).
The picks of micro-batch i are a function of (seed, i) alone (numpy's Generator seeded with both),
so the mixing RNG's state is the count of micro-batches drawn; with each source's sampler position
that is the whole state a checkpoint holds, and a resumed stage draws exactly the same sequences.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data.prepared_data import PreparedData, prepare_data
from stagewise.data.sampler import WindowSampler
from stagewise.data.sources import data_file_keys
from stagewise.errors import UserError


@dataclass(frozen=True)
class MixSourceData:
    name: str
    weight: float  # its share of the sequences (the weights sum to 1)
    data: PreparedData


@dataclass(frozen=True)
class MixedData:
    sources: tuple[MixSourceData, ...]
    tokenizer: Tokenizer
    vocab_size: int
    fingerprint: str  # of the sources' token streams, names and weights

    @property
    def n_train(self) -> int:
        return sum(len(s.data.train) for s in self.sources)

    def check_windows(self, block_size: int, where: str) -> None:
        """Every source holds one training and one validation sequence of `block_size`."""
        for i, source in enumerate(self.sources):
            for split in ("train", "val"):
                tokens = len(getattr(source.data, split))
                if tokens - 1 < block_size:
                    raise UserError(f"{where}.mix[{i}]", f"source '{source.name}' has {tokens} {split} tokens: too few "
                                                         f"for one sequence of {block_size}")


def prepare_mixture(cfg: DataConfig, where: str, tokenizer: Tokenizer, tok_cfg: TokenizerConfig, plan_dir: Path,
                    cache_root: Path, seed: int) -> MixedData:
    """Each source of `cfg.mix` read as a stage's data (the other data keys apply to all) and
    encoded with the plan's `tokenizer`; `where` is the data's key path."""
    assert cfg.mix is not None
    total = sum(s.weight for s in cfg.mix)
    sources = []
    for i, source in enumerate(cfg.mix):
        at = f"{where}.mix[{i}]"
        own = cfg.model_copy(update={"mix": None, "train": source.train, "val": source.val})
        try:
            with data_file_keys(own, plan_dir, at):
                data = prepare_data(own, tok_cfg, plan_dir, cache_root, seed=seed, tokenizer=tokenizer)
        except UserError as e:  # data.sources names the plan's own keys: name the source's
            if not e.where.startswith("data."):
                raise
            raise UserError(f"{at}.{e.where.removeprefix('data.')}", e.message) from None
        sources.append(MixSourceData(source.label(i), source.weight / total, data))
    fingerprint = hashlib.sha256(json.dumps([[s.name, s.weight, s.data.fingerprint] for s in sources]).encode())
    return MixedData(tuple(sources), tokenizer, tokenizer.get_vocab_size(), fingerprint.hexdigest())


class MixtureSampler:
    """Micro-batches of `batch_size` sequences, each from a source picked by the weights."""

    def __init__(self, data: MixedData, block_size: int, batch_size: int, seed: int) -> None:
        self.sources = [WindowSampler(s.data.train, block_size, batch_size, seed=_source_seed(seed, i))
                        for i, s in enumerate(data.sources)]
        self.weights = np.array([s.weight for s in data.sources])
        self.batch_size, self.seed, self.block_size = batch_size, seed, block_size
        self.windows = sum(s.windows_per_epoch for s in self.sources)
        self.drawn = 0  # micro-batches drawn: the mixing RNG's state
        self.epoch = 0  # passes over the mixture: as many sequences as all its sources hold together

    def _drew(self) -> None:
        self.drawn += 1
        self.epoch = self.drawn * self.batch_size // self.windows

    def picks(self, index: int) -> np.ndarray:
        """The source of each sequence of micro-batch `index`."""
        return np.random.default_rng([self.seed, index]).choice(len(self.sources), size=self.batch_size, p=self.weights)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        pick = self.picks(self.drawn)
        self._drew()
        x = torch.empty((self.batch_size, self.block_size), dtype=torch.int64)
        y = torch.empty_like(x)
        for i, source in enumerate(self.sources):
            rows = torch.from_numpy(np.flatnonzero(pick == i))
            if len(rows):
                x[rows], y[rows] = source.next_windows(len(rows))
        return x, y

    def epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of this pass over the mixture (a full batch of a mix is refused by plan.resolve)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def skip(self, batches: int) -> None:
        for _ in range(batches):
            counts = np.bincount(self.picks(self.drawn), minlength=len(self.sources))
            self._drew()
            for source, count in zip(self.sources, counts, strict=True):
                source.skip_windows(int(count))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.drawn, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"sampler state has {len(state['sources'])} sources, this mixture {len(self.sources)}")
        for source, saved in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(saved)
        self.drawn = int(state["position"])
        self.epoch = self.drawn * self.batch_size // self.windows


def _source_seed(seed: int, index: int) -> int:
    """Each source's own shuffling seed, drawn from the stage's."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)
