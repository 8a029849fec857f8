"""A resolved stage: what the engine runs, every number settled (plan.resolve)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stagewise.config.stage_config import StageConfig
from stagewise.optim.batch_ramp import BatchRamp
from stagewise.optim.schedules import lr_at
from stagewise.plan.tree import StageNode


@dataclass(frozen=True)
class ResolvedStage:
    index: int
    node: StageNode  # its place in the stage tree
    config: StageConfig
    key: str  # the stage cache's identity of this stage (plan.stage_keys)
    parent: str | None
    parent_step: int | None  # the parent's step this stage branches from; None: its end
    optimizer: str  # optimizer name, inherited when the stage does not set one
    optimizer_settings: dict[str, Any]  # complete; "lr" is the stage's peak LR
    handoff: str  # what becomes of the parent's optimizer state: carry | convert | reset
    auto_lr: bool  # lr auto: the SWATS estimate replaces the planned (continued) LR at the start
    # no lr set, continuing a parent whose LR is known only at run time (lr auto, or continuing
    # one that is): the plan holds a placeholder, and the parent's real LR scales it at the start
    lr_at_run: bool
    track_swats: bool  # keep the SWATS estimate: a rule or a child stage needs it
    steps: int  # optimizer updates in this stage
    start_step: int  # global step of this stage's first update
    start_tokens: int  # training tokens seen before this stage
    block_size: int  # tokens per sequence (causal_lm); 1 for the example-level tasks
    batch_size: int  # sequences (examples) per micro-batch
    micro_batches: int  # micro-batches per update (1 + accumulation, or a whole pass when full)
    full_batch: bool
    windows_per_epoch: int  # training sequences (examples) in one pass over the data
    unit: str = "tokens"  # what the stage counts: tokens (causal_lm) or examples
    ramp: BatchRamp | None = None  # a batch that grows over the stage (optim.batch_ramp)
    merged: tuple[int, ...] = ()  # a merge stage (0 steps): the parent's steps whose checkpoints it averages

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def trains_with(self) -> str:
        """What the console, events and report name the stage's updates by ("merge": it has none)."""
        return "merge" if self.merged else self.optimizer

    @property
    def peak_lr(self) -> float:
        return float(self.optimizer_settings["lr"])

    @property
    def tokens_per_step(self) -> int | None:
        """Tokens (examples, for the example-level tasks) per update; None when the batch ramps
        (`tokens_before`)."""
        if self.ramp is not None:
            return None
        return self.sequences_at(0) * self.block_size

    def micro_batches_at(self, step: int) -> int:
        """Micro-batches of update `step` (not of a full batch: that is the rest of the epoch)."""
        return self.micro_batches if self.ramp is None else self.ramp.micro_batches(step)

    def sequences_at(self, step: int) -> int:
        """Sequences (examples) of update `step`."""
        if self.full_batch:
            return self.windows_per_epoch
        return self.batch_size * self.micro_batches_at(step)

    def tokens_before(self, step: int) -> int:
        """Tokens (examples) of the stage's first `step` updates."""
        if self.ramp is None:
            return step * self.sequences_at(0) * self.block_size
        return self.ramp.sequences_before(step) * self.block_size

    def epochs_done(self, step: int) -> int:
        """Epochs the stage's first `step` updates complete. An epoch is what `epochs` counts:
        ceil(windows / sequences per update) updates, so a stage of E epochs ends on the end of its
        E-th (the samplers run on into the next pass within an update, so passes over the data may
        end a little earlier); with a ramp, whole passes over the data."""
        if self.ramp is not None:
            return self.ramp.sequences_before(step) // self.windows_per_epoch
        return step // math.ceil(self.windows_per_epoch / self.sequences_at(0))

    def lr(self, step: int) -> float:
        """LR at `step` of this stage (0 <= step <= steps; `steps` is the value it ends on), scaled
        with the batch when it ramps with `lr_scaling`."""
        if not self.steps:  # a merge stage: the LR its parent ended on, for a child to continue from
            return self.peak_lr
        lr = lr_at(self.config.schedule, step, self.steps, self.peak_lr)
        return lr if self.ramp is None or self.ramp.lr_power == 0.0 else lr * self.ramp.lr_factor(step)


@dataclass(frozen=True)
class StageData:
    """What resolution needs of a stage's data: its size and what identifies it."""

    n_train: int  # tokens (causal_lm) or examples in the training split
    unit: str  # "tokens" | "examples"
    fingerprint: str  # of the encoded data (causal_lm: in `identity` already)
