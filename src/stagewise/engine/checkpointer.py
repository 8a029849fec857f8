"""A stage's checkpoints in the stage store: every N steps / M minutes, at the steps branches start
from, on a stop request (then the run stops), at the stage's end, and the ones a rollback goes
back to (the stage's start, its best evaluation), which pruning keeps."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from stagewise.engine.checkpoint import (
    InvalidCheckpoint,
    StageStore,
    load_checkpoint,
    save_checkpoint,
)
from stagewise.engine.context import RunContext
from stagewise.engine.progress import StageSummary
from stagewise.engine.sharded import full_model
from stagewise.engine.signals import StopRequest
from stagewise.errors import RunStopped
from stagewise.plan.resolved import ResolvedStage

Capture = Callable[[], dict[str, Any]]


class Checkpointer:

    def __init__(self, run: RunContext, stage: ResolvedStage, model: nn.Module, store: StageStore, pins: set[int],
                 stop: StopRequest, stop_after: int | None, hint: str) -> None:
        self.run, self.stage, self.model, self.store, self.pins = run, stage, model, store, pins
        self.stop, self.stop_after, self.hint = stop, stop_after, hint
        self.config = run.plan.checkpoint
        self.last_save = time.monotonic()
        self.kept: dict[str, int] = {}  # role ("start", "best") -> step: states rollbacks go back to

    def __call__(self, step: int, capture: Capture) -> None:
        """After every update: save when one is due; may stop the run."""
        global_step = self.stage.start_step + step
        stopping = self.stop.requested or (self.stop_after is not None and global_step >= self.stop_after)
        every = self.config.every is not None and step % self.config.every == 0
        timely = self.config.minutes is not None and time.monotonic() - self.last_save >= self.config.minutes * 60
        stopping, timely = self.run.world.any(stopping, timely)  # a signal or clock one rank saw stops all at once
        if every or timely or step in self.pins or stopping:
            self._save(self.store.step_dir(step), capture(), step)
            self._prune()
        if stopping:
            how = f"signal {self.stop.signal}" if self.stop.signal is not None else "request"
            raise RunStopped(f"stopped by {how} at step {step} of stage '{self.stage.name}' (plan step "
                             f"{global_step}); checkpoint saved. Resume with: {self.hint}",
                             code=128 + (self.stop.signal or 2))

    def save(self, step: int, capture: Capture, keep: str | None = None) -> None:
        """Save now; `keep` ("start", "best"): a role in which it is never pruned, until another
        checkpoint takes the role."""
        self._save(self.store.step_dir(step), capture(), step)
        if keep is not None:
            self.keep(keep, step)
        self._prune()

    def keep(self, role: str, step: int) -> None:
        """Give a saved checkpoint a role again (after a resume)."""
        self.kept[role] = step

    def steps(self) -> list[int]:
        return self.store.steps()

    def load(self, step: int, restore: Callable[[dict[str, Any]], None]) -> None:
        """Restore exactly that checkpoint (the best evaluation's, which no other stands in for)."""
        try:
            load_checkpoint(self.store.step_dir(step), self.store.key, self.model, apply=restore)
        except InvalidCheckpoint as e:
            self.invalid(step, e, "the stage cannot end on it")
            raise RunStopped(f"stage '{self.stage.name}' cannot end on its best evaluation: {e}", code=1) from None

    def go_back(self, step: int, restore: Callable[[dict[str, Any]], None]) -> int:
        """Restore the newest valid checkpoint at or before `step` (its state through `restore`,
        its weights into the model); returns its step. An invalid one is reported and skipped."""
        for saved in reversed([s for s in self.store.steps() if s <= step]):
            try:
                load_checkpoint(self.store.step_dir(saved), self.store.key, self.model, apply=restore)
                return saved
            except InvalidCheckpoint as e:
                self.invalid(saved, e, "going back further")
        raise RunStopped(f"stage '{self.stage.name}' cannot go back to step {step} or before: no valid checkpoint "
                         f"there. Resume with: {self.hint}", code=1)

    def invalid(self, step: int | None, error: InvalidCheckpoint, then: str) -> None:
        """Report a checkpoint that does not read back: one line and a `checkpoint_invalid` event."""
        self.run.logs.event("checkpoint_invalid", stage=self.stage.name, key=self.store.key,
                            step=step if step is not None else "final", reason=str(error), then=then)
        self.run.view.print(f"warning: {error}; {then}")

    def save_final(self, state: dict[str, Any], summary: StageSummary) -> None:
        """The stage's end, with its log lines (a run reusing it brings them back)."""
        state = {**state, "logs": self.run.logs.stage_lines(self.stage.name)}
        self._save(self.store.final_dir, state, summary.steps, summary=dataclasses.asdict(summary))
        self._prune()

    def _prune(self) -> None:
        """After every save; with several ranks the others wait here until rank 0 has written it."""
        if self.run.world.is_main:
            self.store.prune(self.config.keep, self.pins | set(self.kept.values()))
        self.run.world.barrier()

    def _save(self, directory: Path, state: dict[str, Any], step: int, **meta: Any) -> None:
        with full_model(self.run.world, self.model) as model:  # every rank holds the same state; rank 0 writes it
            if model is not None:
                save_checkpoint(directory, model, state, {"key": self.store.key, "stage": self.stage.name,
                                                          "step": step, **meta})
        self.last_save = time.monotonic()
        self.run.logs.event("checkpoint_saved", stage=self.stage.name, step=self.stage.start_step + step,
                            stage_step=step, final=directory.name == "final")
