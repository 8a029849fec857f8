"""Data-parallel training across processes started by torchrun (`torchrun --nproc-per-node N -m
stagewise train PLAN`): which process this is, the process group, and the few collectives the
engine needs. A single process (no torchrun, or WORLD_SIZE 1) gets `World()`, whose collectives
return their inputs: it never touches torch.distributed.

How a run splits (docs/how-to/distributed.md):
- The sampler draws the plan's global micro-batch on every rank (its state stays global, so a run
  resumes at any world size); each rank trains on its contiguous share of the rows (`shard`),
  weighted by its part of what the task's loss is a mean over (rows, or target tokens: counted
  from the global micro-batch every rank holds, no communication), so that DDP's mean over ranks
  is the mean over the whole micro-batch.
- The model is wrapped in DistributedDataParallel (`Replicas`); gradients are all-reduced on the
  update's last micro-batch only (`no_sync` before it).
- The update's loss is all-reduced (`mean`), so the guards, rules and the non-finite watch read the
  same numbers on every rank; flags that come from a clock or a signal are agreed (`any`).
- Rank 0 evaluates and sends the metrics to the others (`from_main`); it alone writes logs,
  checkpoints and exports, and holds the run's and the stages' locks.
- `distributed: {strategy: fsdp}` shards the weights instead of replicating them (engine.sharded):
  no DDP wrapper; every rank evaluates in step, and a checkpoint's or export's weights are
  gathered from all ranks for rank 0 to write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from stagewise.errors import UserError
from stagewise.plan.resolved import ResolvedStage

T = TypeVar("T")
Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharded: bool = False  # fsdp: the weights are sharded over the ranks (engine.sharded)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def place(self, device: torch.device) -> torch.device:
        """The device of this rank: CUDA device LOCAL_RANK when training on CUDA."""
        if self.parallel and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.parallel:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over the ranks (a NaN on any rank makes it NaN on all)."""
        if not self.parallel:
            return value
        total = value.detach().clone()
        torch.distributed.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.size

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on every rank when it is true on any (a signal, a clock)."""
        if not self.parallel:
            return flags
        agreed = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(f) for f in agreed.tolist())

    def from_main(self, compute: Callable[[], T]) -> T:
        """`compute()` on rank 0, its value on every rank."""
        if not self.parallel:
            return compute()
        box: list[Any] = [compute() if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def evaluated(self, compute: Callable[[], T]) -> T:
        """Rank 0's evaluation on every rank: computed by rank 0 alone and sent; with sharded weights
        by every rank in step (each forward gathers the weights from all), on the same batches."""
        return compute() if self.sharded else self.from_main(compute)

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order."""
        if not self.parallel:
            return [value]
        values: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        return values

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it fills caches the others then read), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def on_main(self, manager: AbstractContextManager[T]) -> AbstractContextManager[T | None]:
        """`manager` entered on rank 0 only (a lock only one process may hold); None elsewhere."""
        return manager if self.is_main else nullcontext()

    def shard(self, batch: Batch, share: float, targets: torch.Tensor | None = None) -> tuple[Batch, float]:
        """This rank's rows of a global micro-batch and their share of the update. `targets`: what
        the loss is a mean over (Task.targets): None, the rows; else each row's count of target
        tokens. Shares are scaled by this rank's part of them x ranks, so DDP's mean over ranks is
        the mean over the whole micro-batch, as one process takes it. A rank left without rows (a
        short last batch) or targets trains one row that has some at weight 0."""
        if not self.parallel:
            return batch, share
        rows = batch[0].size(0)
        counts = [1] * rows if targets is None else targets.tolist()
        lo, hi = self.rank * rows // self.size, (self.rank + 1) * rows // self.size
        part = sum(counts[lo:hi])
        if part == 0:
            first = next((i for i, n in enumerate(counts) if n), 0)
            return tuple(t[first:first + 1] for t in batch), 0.0
        return tuple(t[lo:hi] for t in batch), share * part * self.size / sum(counts)


SINGLE = World()


@contextmanager
def joined() -> Iterator[World]:
    """The world torchrun started this process in (RANK, WORLD_SIZE, LOCAL_RANK), its process group
    open for the block: gloo for CPU tensors, NCCL for CUDA ones. Without torchrun: World()."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield World()
        return
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    try:
        yield world
        world.barrier()  # no rank leaves while another still works (rank 0 writes the sample, exports)
    finally:
        torch.distributed.destroy_process_group()


class Replicas:
    """The task's training forward, through DistributedDataParallel when there are several ranks.
    DDP wraps a module holding the task's model whose forward is the task's loss, so every task
    (and a compiled loss) is wrapped the same way. DDP all-reduces only the parameters that
    require gradients when it is built: it is built again when that set changes (gradual unfreezing)."""

    def __init__(self, loss: Callable[[Batch], torch.Tensor], model: nn.Module, world: World,
                 device: torch.device) -> None:
        self.loss_of, self.model, self.world, self.device = loss, model, world, device
        self._ddp: nn.Module | None = None
        self._trainable: tuple[bool, ...] | None = None

    def loss(self, batch: Batch) -> torch.Tensor:
        if not self.world.parallel or self.world.sharded:  # a sharded model reduces its own gradients
            return self.loss_of(batch)
        return self._wrapped()(*batch)

    def syncing(self, sync: bool) -> AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward: gradients are all-reduced only when `sync`
        (the update's last micro-batch); before it they accumulate locally (DDP's no_sync)."""
        if not self.world.parallel or self.world.sharded or sync:
            return nullcontext()
        return self._wrapped().no_sync()  # type: ignore[operator]

    def _wrapped(self) -> nn.Module:
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or trainable != self._trainable:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Unused parameters (a head's, a frozen path's) are found each forward, so a model
            # whose forward leaves some out trains; their gradients stay None, as in one process.
            self._ddp = DistributedDataParallel(_LossModule(self.loss_of, self.model), device_ids=ids,
                                                broadcast_buffers=False, find_unused_parameters=True)
            self._trainable = trainable
        return self._ddp


class _LossModule(nn.Module):
    """The model as a submodule (DDP finds its parameters), the task's loss as the forward."""

    def __init__(self, loss: Callable[[Batch], torch.Tensor], model: nn.Module) -> None:
        super().__init__()
        self.model, self._loss = model, loss

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self._loss(batch)


def check_split(world: World, stages: list[ResolvedStage], plan_file: str) -> None:
    """Each update's sequences split evenly over the ranks: a micro-batch of `batch.size` becomes
    `batch.size / world` per rank, `accumulate` stays (full-batch passes split every batch, the
    last one unevenly). UserError naming the key otherwise."""
    if not world.parallel:
        return
    for stage in stages:
        if not stage.full_batch and not stage.merged and stage.batch_size % world.size:  # a merge trains nothing
            raise UserError(f"{plan_file}: stages[{stage.index}].batch.size",
                            f"{stage.batch_size} sequences per micro-batch do not split over {world.size} processes: "
                            f"make it a multiple of {world.size} (each rank trains batch.size / {world.size})")


def split_fields(world: World, stage: ResolvedStage) -> dict[str, int]:
    """What plan_start records of how a stage's update is split over the ranks."""
    return {"batch_per_rank": -(-stage.batch_size // world.size), "accumulate": stage.micro_batches}
