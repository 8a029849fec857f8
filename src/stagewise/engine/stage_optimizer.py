"""The optimizer a stage trains with, and every way it changes hands: from the parent's at the
stage's start (`handoff: carry | convert | reset`, `lr: auto`), to a rule's `switch` mid-stage,
and back from a checkpoint (resume, rollback). Which optimizer is in use is known here and only
here, so what depends on it is decided in one place: sgd_l1 applies L1 by its proximal step, every
other optimizer through the loss; the SWATS estimate follows Adam's steps only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stagewise.config.optimizer_config import ADAM
from stagewise.engine.run_logs import RunLogs
from stagewise.engine.sharded import full_optimizer_state, sharded_optimizer_state
from stagewise.errors import RunStopped
from stagewise.optim.layers import StageLayers
from stagewise.optim.optimizers import apply_settings, build_optimizer
from stagewise.optim.swats import SwatsEstimate, convert_adam_to_sgd, swats_lr
from stagewise.plan.resolved import ResolvedStage


@dataclass
class HeldState:
    """Which stage state the model (and optimizer) in memory hold: (stage key, step or None for
    its end). A stage whose parent state is not in memory loads it from the store."""

    marker: tuple[str, int | None] | None = None
    optimizer: torch.optim.Optimizer | None = None  # the live optimizer of that state, if any
    optimizer_state: dict[str, Any] | None = None  # else its saved state, when loaded from the store
    optimizer_spec: dict[str, Any] | None = None  # {"name", "settings"} of that optimizer
    swats: dict[str, Any] | None = None  # its SWATS estimate, when the stage kept one
    lr_factor: float = 1.0  # its last update's LR over the planned one (lr auto, a rule's scaling)

    def hold(self, marker: tuple[str, int | None], stage: ResolvedStage, state: dict[str, Any],
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Note the state of `stage` (its checkpoint's hand-off part, StageOptimizer.state_dict) as held."""
        self.marker, self.optimizer = marker, optimizer
        self.optimizer_state = None if optimizer is not None else state["optimizer"]
        self.optimizer_spec = state["optimizer_spec"] or {"name": stage.optimizer, "settings": stage.optimizer_settings}
        self.swats = state["swats"]
        self.lr_factor = _lr_factor(stage, marker[1], optimizer.param_groups if optimizer is not None
                                    else state["optimizer"]["param_groups"])

    def forget(self) -> None:
        self.marker, self.optimizer, self.optimizer_state, self.lr_factor = None, None, None, 1.0


def _lr_factor(stage: ResolvedStage, step: int | None, groups: list[dict[str, Any]]) -> float:
    """The LR of the last update before `step` (None: the stage's end), read from the optimizer
    that made it (the engine sets each group's to the stage's LR times its scale), over the LR
    planned there. Read from the state, not saved beside it: stage caches from before hold it too."""
    last = (stage.steps if step is None else step) - 1
    planned = stage.lr(last) if last >= 0 else 0.0
    group = groups[0]
    return group["lr"] / group["lr_scale"] / planned if planned > 0.0 and group["lr_scale"] > 0.0 else 1.0


class StageOptimizer:
    def __init__(self, stage: ResolvedStage, model: nn.Module, layers: StageLayers) -> None:
        self.stage, self.model, self.layers = stage, model, layers
        self.spec: dict[str, Any] | None = None  # {"name", "settings"} after a rule's switch; None: the stage's own
        self.optimizer = self._build(stage.optimizer, stage.optimizer_settings)

    @property
    def name(self) -> str:
        return self.spec["name"] if self.spec is not None else self.stage.optimizer

    @property
    def loss_l1(self) -> float:
        """The L1 strength added to the loss: none under sgd_l1, whose proximal step applies it."""
        return 0.0 if self.name == "sgd_l1" else self.stage.config.regularization.l1

    @property
    def follows_adam(self) -> bool:
        return self.name in ADAM

    def _build(self, name: str, settings: dict[str, Any]) -> torch.optim.Optimizer:
        """Over every parameter the stage may train (gradual unfreezing hands them gradients later)."""
        return build_optimizer(name, settings, self.model, l1=self.stage.config.regularization.l1,
                               lr_scales=self.layers.scales, trainable=self.layers.held)

    # --- at the stage's start ---------------------------------------------------------------------

    def hand_off(self, held: HeldState, logs: RunLogs) -> float | None:
        """Take what the parent's optimizer hands on: its state (carry), Adam's moment as SGD's
        momentum (convert), or nothing (reset); always logged, with the reason. Returns the factor
        on the planned LR when the LR is only now known (lr auto, or continuing a parent's that
        was), else None."""
        stage = self.stage
        settings = dict(stage.optimizer_settings)
        where = {"stage": stage.name, "step": stage.start_step, "optimizer": stage.optimizer}
        factor = held.lr_factor if stage.lr_at_run else None
        if stage.auto_lr:
            if held.swats is None:
                raise RunStopped(f"stage '{stage.name}' has lr auto, but its parent's checkpoint holds no SWATS "
                                 "estimate; rerun with --fresh", code=2)
            swats = SwatsEstimate(0.0)
            swats.load_state_dict(held.swats)
            settings["lr"] = start_lr = swats_lr(swats, settings.get("momentum", 0.0), f"stages.{stage.name}.optimizer.lr")
            base = stage.lr(0)  # the LR at the stage's first update becomes the estimate
            factor = start_lr / base if base > 0.0 else 1.0
            logs.event("lr_auto", **where, lr=start_lr, swats_estimate=swats.corrected, swats_steps=swats.k)
        parent, spec = held.optimizer, held.optimizer_spec
        if parent is None and held.optimizer_state is not None and spec is not None and stage.handoff != "reset":
            parent = self._build(spec["name"], spec["settings"])
            parent.load_state_dict(held.optimizer_state)
        expected = {"carry": (stage.optimizer,), "convert": ADAM, "reset": None}[stage.handoff]
        if expected is not None and spec is not None and spec["name"] not in expected:
            self.optimizer = self._build(stage.optimizer, settings)
            logs.event("optimizer_reset", **where, reason=f"handoff {stage.handoff} asked for, but a rule "
                                                          f"switched the parent to {spec['name']}")
            return factor
        if stage.handoff == "carry" and parent is not None:
            apply_settings(parent, stage.optimizer, settings, l1=stage.config.regularization.l1)
            self.optimizer = parent
            logs.event("optimizer_carried", **where)
            return factor
        self.optimizer = self._build(stage.optimizer, settings)
        if stage.handoff == "convert" and parent is not None:
            converted = convert_adam_to_sgd(parent, self.optimizer)
            logs.event("optimizer_converted", **where, converted_parameters=converted,
                       how="sgd momentum buffer = adam m_hat / (1 - momentum)")
            return factor
        logs.event("optimizer_reset", **where, reason="first stage" if stage.parent is None else "handoff: reset")
        return factor

    # --- mid-stage ---------------------------------------------------------------------------------

    def switch(self, name: str, settings: dict[str, Any], handoff: str) -> int:
        """A rule's switch: a new optimizer (complete `settings`, lr included) for the rest of the
        stage; on `convert`, Adam's moment becomes SGD's momentum. Returns how many parameters
        were converted."""
        new = self._build(name, settings)
        converted = convert_adam_to_sgd(self.optimizer, new) if handoff == "convert" else 0
        self.optimizer, self.spec = new, {"name": name, "settings": settings}
        return converted

    def reset_moments(self) -> int:
        """The guard's `reset_moments`: every parameter's state starts afresh at the next step (Adam
        counts from step 1 again, so its bias correction holds). Returns how many had state."""
        held = len(self.optimizer.state)
        self.optimizer.state.clear()  # muon's two halves share this dict
        return held

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    # --- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The hand-off part of a checkpoint (with the SWATS estimate, added by the trainer): what a
        child stage may take over."""
        return {"optimizer": full_optimizer_state(self.optimizer.state_dict()), "optimizer_spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with a checkpoint's optimizer: rebuilt when it is not the one in use (a rule
        switched before or after the checkpoint), then its state loaded."""
        spec = state["optimizer_spec"]
        if spec != self.spec:
            self.optimizer = self._build(spec["name"], spec["settings"]) if spec is not None else \
                self._build(self.stage.optimizer, self.stage.optimizer_settings)
            self.spec = spec
        self.optimizer.load_state_dict(sharded_optimizer_state(self.optimizer, state["optimizer"]))
