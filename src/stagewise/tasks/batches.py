"""Example-level batches for the fine-tuning tasks: what their `prepare_*` read (ExampleFiles), a
seeded train/validation split of records, and a resumable sampler of shuffled mini-batches (the
causal-LM path has its own window sampler, data.sampler)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from stagewise.data.split import held_out
from stagewise.errors import UserError
from stagewise.tasks.readers import Records

T = TypeVar("T")


class Rows(Protocol):
    """Encoded examples: how many, and a batch of some of them (cut to their longest)."""

    def __len__(self) -> int: ...

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class ExampleFiles:
    """What a fine-tuning task's `prepare_*` reads: its training file; a validation file, else
    `val_fraction` of the training records held out by a shuffle seeded with `seed`; how many
    tokens (tag: words) of each example are kept (None: the task's default); the tables' format
    (csv, tsv or jsonl; None: told by the extensions)."""

    train: Path
    val: Path | None = None
    val_fraction: float = 0.1
    seed: int = 0
    max_len: int | None = None
    fmt: str | None = None

    def split(self, read: Callable[[Path], Records[T]]) -> tuple[Records[T], Records[T]]:
        """The training and validation records, each file read with `read`."""
        records = read(self.train)
        if self.val is not None:
            return records, read(self.val)
        return split_records(records, self.val_fraction, self.seed)


def split_records(records: Records[T], fraction: float, seed: int) -> tuple[Records[T], Records[T]]:
    """A seeded split that keeps each record's file line (for the messages about it)."""
    train, val = held_out(len(records), fraction, seed)
    if not train:
        raise UserError(str(records.path), f"val_fraction {fraction:g} of {len(records)} records leaves "
                                           "none for training")

    def part(index: list[int]) -> Records[T]:
        return Records([records[i] for i in index], records.path, [records.lines[i] for i in index])
    return part(train), part(val)


class ExampleSampler:
    """Shuffled mini-batches of examples, epoch after epoch. Each epoch's order is a function of
    (seed, epoch) alone, so the state is two integers and a resumed run draws the same batches."""

    def __init__(self, data: Rows, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63))

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next batch; the last one of an epoch may be smaller (no example is dropped). The
        epoch has advanced by the time its last batch is returned."""
        index = self._order[self.position:self.position + self.batch_size]
        self.position += index.numel()
        if self.position >= len(self.data):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        return self.data.rows(index)

    def epoch_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The rest of the current epoch, batch by batch (a full-batch update)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def skip(self, batches: int) -> None:
        """Pass over the next `batches` batches without reading them."""
        for _ in range(batches):
            take = min(self.batch_size, len(self.data) - self.position)
            self.position += take
            if self.position >= len(self.data):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()

    def batches_per_epoch(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
