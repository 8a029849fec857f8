"""Callbacks: code that reacts to training, called by the stage trainer at seven points of each
stage. The plan's own reactions (fault injection, the non-finite watch, the guard, SWATS, weight
averaging, the rules) are built-in callbacks (engine.reactions); a user's are passed to
`stagewise.train(..., callbacks=[...])`, and a search reports evaluations to its pruner through one.

Order: the built-ins that look at an update before it is applied (faults, watch, guard) come
first, then the user's callbacks in the order given, then SWATS, averaging and the rules. A hook
that returns a veto or an end reason stops the other callbacks' same hook from being asked
(`before_optimizer_step`) or is kept as the first reason (`after_evaluation`).

State: `state_dict()` goes into every checkpoint under its callback's `key` and comes back with
`load_state_dict` when a stage resumes, so a resumed run calls its callbacks exactly as an
uninterrupted one. A rollback (guard, rule) does not restore it: like the rules' memory, what a
callback learnt stays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stagewise.config.registry import CALLBACKS
from stagewise.config.track_config import CallbackUse
from stagewise.errors import UserError
from stagewise.tasks.user_task import code_fingerprint

if TYPE_CHECKING:
    from stagewise.engine.loop import StageTrainer


@dataclass
class StepState:
    """One update as the callbacks see it. `step`: the update's index in the stage (0-based: the
    updates done before it); `loss` and `grad_norm` are set once the gradients are in (the norm
    only when something needs it: clipping, a log line, a guard, or a callback with
    `needs_grad_norm`). `loss_factors` and `corrupt` let a callback at `before_step` change the
    update's loss (each micro-batch's loss is multiplied by the factors in order) or poison its
    batches (the task's `corrupt`): fault injection."""

    step: int
    lr: float
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    loss_factors: list[float] = field(default_factory=list)
    corrupt: bool = False
    evaluates: bool = False  # set before `after_update`: an evaluation follows this update
    end: str | None = None  # set at `after_update` to end the stage after this update (why)


class Callback:
    """Base class of callbacks: every hook does nothing. Override the ones you need.

    `trainer` (engine.loop.StageTrainer) is the stage being trained: `trainer.stage.name`,
    `trainer.progress.step` (updates done), `trainer.model`, `trainer.opt.optimizer`,
    `trainer.run.logs.event(...)`. Hooks run on every rank of a data-parallel run."""

    needs_grad_norm: bool = False  # compute the gradient norm on every update (a host sync when read)

    @property
    def key(self) -> str:
        """Its name in a checkpoint's callback states; unique among a run's callbacks."""
        return type(self).__qualname__

    def stage_start(self, trainer: StageTrainer) -> None:
        """The stage starts or resumes (`trainer.resumed`), before its first update here."""

    def before_step(self, trainer: StageTrainer, update: StepState) -> None:
        """Before the update's batches are drawn (its LR is set)."""

    def before_optimizer_step(self, trainer: StageTrainer, update: StepState) -> bool | None:
        """The gradients are in, not yet applied. Return False to veto the update: its gradients
        are dropped and it counts as spent (the batches are not drawn again, the schedule goes on),
        unless the callback moved the trainer back to a checkpoint (the guard's rollback)."""
        return None

    def after_update(self, trainer: StageTrainer, update: StepState) -> None:
        """The optimizer has stepped; the update is counted (`trainer.progress.step`) and logged,
        its gradients are still in place. Set `update.end` to end the stage after it."""

    def after_evaluation(self, trainer: StageTrainer, metrics: dict[str, float]) -> str | None:
        """After a mid-stage evaluation (its metrics, with train_loss). Return a reason to end the
        stage early (then logged as stage_stopped_early); raising RunStopped stops the run."""
        return None

    def on_checkpoint(self, trainer: StageTrainer, step: int) -> None:
        """A checkpoint of the stage at `step` is being written (raise to refuse it)."""

    def stage_end(self, trainer: StageTrainer) -> None:
        """The stage has ended on its final weights (after its final evaluation)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` gave, when a stage resumes from a checkpoint."""


def plan_callbacks(uses: Sequence[CallbackUse]) -> list[Callback]:
    """The callbacks a plan names (`callbacks:`), made from their registered classes and settings."""
    made = []
    for i, use in enumerate(uses):
        entry = CALLBACKS[use.name]
        try:
            made.append(entry.cls() if entry.settings is None else entry.cls(use.settings))
        except Exception as e:  # the plug-in's constructor: named, not a traceback from inside it
            raise UserError(f"callbacks[{i}]", f"callback '{use.name}' ({entry.cls.__qualname__}) failed to start: "
                                               f"{type(e).__name__}: {e}") from e
    return made


def callback_identity(use: CallbackUse, index: int) -> dict[str, Any]:
    """What a plan's callback puts in the stage keys: its name, its settings and its code (the
    class's declared `version`, else its source: tasks.user_task.code_fingerprint)."""
    entry = CALLBACKS[use.name]
    settings = use.settings.model_dump(mode="json") if entry.settings is not None else {}
    return {"name": use.name, "settings": settings,
            "code": code_fingerprint(entry.cls, f"callbacks[{index}]", "callback class")}


def check_callbacks(callbacks: Sequence[Callback]) -> tuple[Callback, ...]:
    """The user's callbacks, checked: Callback instances with distinct keys (their checkpoint states)."""
    seen: set[str] = set()
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise UserError(f"callbacks[{i}]", f"not a stagewise.Callback: {type(cb).__name__} (subclass "
                                               "stagewise.Callback and override its hooks)")
        if cb.key in seen:
            raise UserError(f"callbacks[{i}]", f"a second callback with key '{cb.key}': give each its own key "
                                               "(override the key property), so each state is saved apart")
        seen.add(cb.key)
    return tuple(callbacks)
