"""A merge stage's start: instead of its parent's end, the weighted mean of the parent's
checkpoints at the steps plan.resolve picked (`ResolvedStage.merged`: the parent saves and keeps
them, as it does a branch's `@STEP`). The stage then makes no update; it is evaluated, saved,
cached and exported as any stage's end (engine.run_plan)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from stagewise.engine.checkpoint import InvalidCheckpoint, load_checkpoint
from stagewise.engine.context import RunContext
from stagewise.engine.prepare_run import Prepared, Stage
from stagewise.engine.stage_optimizer import HeldState
from stagewise.errors import RunStopped
from stagewise.optim.average import merge_coefficients, merge_states


def load_merged(run: RunContext, prepared: Prepared, stage: Stage, held: HeldState) -> None:
    """Put the merge of the parent's checkpoints into the model (it then holds no stage's state)."""
    parent, numbers = stage.parent, stage.resolved
    assert parent is not None and numbers.config.merge is not None  # plan.tree, plan.resolve
    store, model = prepared.store(parent), stage.model
    held.forget()

    def checkpoints() -> Iterator[dict[str, torch.Tensor]]:
        for step in numbers.merged:  # the parent's end last: its non-float tensors are kept
            directory = store.final_dir if step == parent.resolved.steps else store.step_dir(step)
            try:
                load_checkpoint(directory, parent.key, model)
            except InvalidCheckpoint as e:  # it read back when the parent was checked: changed since
                raise RunStopped(f"cannot merge stage '{stage.name}': a checkpoint of its parent changed while the "
                                 f"run went on: {e}; run again to retrain the parent from its last good step",
                                 code=1) from None
            yield model.state_dict()

    coefficients = merge_coefficients(len(numbers.merged), numbers.config.merge.weights)
    model.load_state_dict(merge_states(checkpoints(), coefficients))
    run.logs.event("merge", stage=stage.name, parent=parent.name, step=numbers.start_step,
                   parent_steps=list(numbers.merged), coefficients=[round(c, 6) for c in coefficients])
    run.view.print(f"[{stage.name}] the mean of {len(numbers.merged)} checkpoints of '{parent.name}' (steps "
                   f"{', '.join(map(str, numbers.merged))}; {numbers.config.merge.weights})")
