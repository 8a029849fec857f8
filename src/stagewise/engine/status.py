"""What the stage store holds of a plan: which stages are complete (reused, never retrained),
which were cut off (resumed), which are still to train. "Complete" is checked as a reuse would
read it: the final checkpoint and every step a branch starts from verify (sha256) and read back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from stagewise.engine.checkpoint import InvalidCheckpoint, StageStore, check_checkpoint
from stagewise.engine.prepare_run import Prepared
from stagewise.engine.stage_optimizer import HeldState
from stagewise.plan.resolve import pinned_steps
from stagewise.plan.resolved import ResolvedStage


def complete(store: StageStore, pins: set[int]) -> bool:
    """The stage's end is saved, and every step a branch starts from (up to that end: a stage a
    rule ended early has no later steps). Cheap: manifests only (see `bad_pin`). InvalidCheckpoint
    when the end's manifest is damaged."""
    manifest = store.final_manifest()
    return manifest is not None and {p for p in pins if p <= manifest["step"]} <= set(store.steps())


def handoff_probe(stage: ResolvedStage) -> Callable[[dict[str, Any]], None]:
    """Reads a checkpoint's state as a child stage takes it over (HeldState), keeping nothing."""
    return lambda state: HeldState().hold((stage.key, None), stage, state)


def bad_pin(store: StageStore, pins: set[int], model: nn.Module,
            stage: ResolvedStage) -> tuple[int, InvalidCheckpoint] | None:
    """The first step a branch starts from whose checkpoint does not read back, and why; None: all do."""
    manifest = store.final_manifest()
    end = manifest["step"] if manifest is not None else max(pins, default=0)
    for step in sorted(p for p in pins if p <= end):
        try:
            check_checkpoint(store.step_dir(step), store.key, model, handoff_probe(stage))
        except InvalidCheckpoint as e:
            return step, e
    return None


def stage_status(prepared: Prepared) -> dict[str, str]:
    """What `train` will do with each stage: reuse it, resume it, or train it."""
    pins = pinned_steps(prepared.resolved)
    status = {}
    for stage in prepared.stages:
        store = prepared.store(stage)
        broken = None
        try:
            done = complete(store, pins[stage.name])
        except InvalidCheckpoint as e:
            done, broken = False, str(e)
        if done:
            pin = bad_pin(store, pins[stage.name], stage.model, stage.resolved)
            try:
                if pin is not None:
                    raise pin[1]
                check_checkpoint(store.final_dir, stage.key, stage.model, handoff_probe(stage.resolved))
                status[stage.name] = "reuse"
                continue
            except InvalidCheckpoint as e:
                broken = str(e)
        resume = None
        for step in reversed(store.steps()):
            try:
                check_checkpoint(store.step_dir(step), stage.key, stage.model)
                resume = step
                break
            except InvalidCheckpoint:
                continue
        status[stage.name] = f"resume at step {resume}" if resume is not None else "train"
        if broken is not None:
            status[stage.name] += f" (not reused: {broken})"
    return status
