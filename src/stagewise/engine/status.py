"""What the stage store holds of a plan: which stages are complete (reused, never retrained),
which were cut off (resumed), which are still to train."""

from __future__ import annotations

from stagewise.engine.checkpoint import StageStore
from stagewise.engine.prepare import Prepared
from stagewise.plan.resolve import pinned_steps


def complete(store: StageStore, pins: set[int]) -> bool:
    """The stage's end is saved, and every step a branch starts from (up to that end: a stage a
    rule ended early has no later steps)."""
    manifest = store.final_manifest()
    return manifest is not None and {p for p in pins if p <= manifest["step"]} <= set(store.steps())


def stage_status(prepared: Prepared) -> dict[str, str]:
    """What `train` will do with each stage: reuse it, resume it, or train it."""
    pins = pinned_steps(prepared.resolved)
    status = {}
    for stage in prepared.stages:
        store = prepared.store(stage)
        if complete(store, pins[stage.name]):
            status[stage.name] = "reuse"
        elif store.steps():
            status[stage.name] = f"resume at step {store.steps()[-1]}"
        else:
            status[stage.name] = "train"
    return status
