"""What the engine asks of a stage's task: batches that resume exactly, the loss of a batch, and
the validation metrics rules read. The trainer (engine.loop) is the same for every task; a task is
its data, its model and these three things.

causal_lm is tasks.lm.LanguageModelTask (windows of a token stream, counted in tokens); the
fine-tuning tasks are `ExampleTask`s (shuffled mini-batches of encoded examples, counted in
examples) over the data and functions of tasks.classify / sft / seq2seq / tag.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from stagewise.tasks.batches import ExampleSampler, Rows

Batch = tuple[torch.Tensor, ...]


class BatchSource(Protocol):
    """A stage's training batches; its state is all a resumed run needs to draw the same ones."""

    epoch: int

    def next_batch(self) -> Batch: ...

    def epoch_batches(self) -> Iterator[Batch]:
        """The rest of the current epoch (one full-batch update)."""

    def skip(self, batches: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(ABC):
    """One stage's task bound to its model, device and precision."""

    kind: str  # the plan's task name
    unit: str  # what a stage's size counts: "tokens" or "examples"

    def __init__(self, model: nn.Module, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[None]]) -> None:
        self.model, self.device, self.autocast = model, device, autocast

    @abstractmethod
    def sampler(self, block_size: int, batch_size: int, seed: int) -> BatchSource: ...

    @abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean training loss of a batch already on the device."""

    def targets(self, batch: Batch) -> torch.Tensor | None:
        """What `loss` is a mean over: None, its rows (each counts one); else how many targets
        (tokens) each row holds. A data-parallel run weighs each rank's loss by it (World.shard)."""
        return None

    @abstractmethod
    def evaluate(self, block_size: int, batch_size: int, limit: int | None) -> dict[str, float]:
        """Validation metrics, `val_loss` first; the same examples every time. `limit`: at most
        that many batches (causal_lm's windows of `block_size`), None: all."""

    @abstractmethod
    def corrupt(self, batch: Batch, step: int) -> Batch:
        """The batch with its inputs replaced by random ids (the same for the same step), as a
        data-pipeline bug would give: for the guard's fault injection."""


class ExampleTask(Task):
    """A fine-tuning task over encoded examples: `train`/`val` rows, a loss function of (model,
    batch) and an evaluation of (model, batch size, device) -> metrics."""

    unit = "examples"

    def __init__(self, model: nn.Module, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[None]], train: Rows, vocab_size: int) -> None:
        super().__init__(model, device, autocast)
        self.train, self.vocab_size = train, vocab_size

    def sampler(self, block_size: int, batch_size: int, seed: int) -> BatchSource:
        return ExampleSampler(self.train, batch_size, seed)

    def loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return self.batch_loss(batch)

    def evaluate(self, block_size: int, batch_size: int, limit: int | None) -> dict[str, float]:
        with self.autocast():
            return self.metrics(batch_size)

    @abstractmethod
    def batch_loss(self, batch: Batch) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self, batch_size: int) -> dict[str, float]:
        """The task's validation metrics over every validation example."""

    def corrupt(self, batch: Batch, step: int) -> Batch:
        g = torch.Generator().manual_seed(step)
        ids = batch[0]
        bad = torch.randint(1, self.vocab_size, ids.shape, generator=g).to(ids.device)  # 1..: not the padding id
        return (torch.where(ids == 0, ids, bad), *batch[1:])
