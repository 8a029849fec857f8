"""What a stage starts from: its parent's state (its end, or the step a branch starts from), or
for a root the plan's model as built; a new head gets the parent LM's backbone; an adapter stage
prepares its adapter (models.adapters: merge the parent's, start a new one)."""

from __future__ import annotations

from stagewise.engine.checkpoint import InvalidCheckpoint, load_checkpoint
from stagewise.engine.context import RunContext
from stagewise.engine.device import derive_seed
from stagewise.engine.prepare_run import Prepared, Stage
from stagewise.engine.stage_optimizer import HeldState
from stagewise.engine.status import handoff_probe
from stagewise.errors import RunStopped
from stagewise.plan.stage_setup import carry_head


def load_parent(run: RunContext, prepared: Prepared, stage: Stage, step: int, held: HeldState) -> None:
    """Put the parent's state into the model (from memory when `held` has it, else the store).
    `step`: the plan step the stage starts at, for the log."""
    if stage.parent is None:  # the plan's model as built (or loaded) by `prepare`
        parent_model = prepared.root
        if held.marker is not None:  # a `from: init` stage after others have trained it
            assert prepared.initial is not None
            parent_model.load_state_dict(prepared.initial)
            held.forget()
    else:
        parent, at = stage.parent, stage.resolved.parent_step
        parent_model = parent.model
        marker = (parent.key, at)
        if held.marker != marker:
            store = prepared.store(parent)
            directory = store.final_dir if at is None else store.step_dir(at)
            try:
                loaded, _ = load_checkpoint(directory, parent.key, parent_model, apply=handoff_probe(parent.resolved))
            except InvalidCheckpoint as e:  # it read back when the parent was reused: changed since
                raise RunStopped(f"cannot start stage '{stage.name}': its parent's checkpoint changed while the "
                                 f"run went on: {e}; run again to retrain the parent from its last good step",
                                 code=1) from None
            held.hold(marker, parent.resolved, loaded)
    adapter = stage.setup.adapter
    if adapter is not None:
        done = adapter.start(parent_model, stage.model, derive_seed(run.plan.seed, stage.name, "adapter"))
        if done:
            run.logs.event("adapter_start", stage=stage.name, step=step, **done)
    if stage.setup.head:
        carried = carry_head(stage.setup, parent_model, f"{stage.resolved.node.where}.task")
        run.logs.event("head_attached", stage=stage.name, step=step, carried_tensors=carried,
                       classes=len(stage.setup.labels or ()))
