"""What every stage of one run shares: where it runs, at what precision, the logs; one dropout
control per model (it remembers the model's own rates, so it must outlive the stages); and an
optional hook on evaluations (a search reports them to its pruner)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagewise.engine.distributed import World
from stagewise.models.build import DropoutControl
from stagewise.plan.schema import Plan
from stagewise.track.logs import RunLogs
from stagewise.track.progress import ProgressView

# (stage name, stage step, metrics) after each mid-stage evaluation; it may raise to stop the run.
EvalHook = Callable[[str, int, dict[str, float]], None]
# Whoever starts a run sets the hook here (`on_eval`) rather than through every call in between.
_EVAL_HOOK: ContextVar[EvalHook | None] = ContextVar("stagewise_eval_hook", default=None)


@contextmanager
def on_eval(hook: EvalHook) -> Iterator[None]:
    """Runs started inside this block call `hook` after each mid-stage evaluation."""
    token = _EVAL_HOOK.set(hook)
    try:
        yield
    finally:
        _EVAL_HOOK.reset(token)


@dataclass
class RunContext:
    plan: Plan
    run_dir: Path
    device: torch.device
    autocast: Callable[[], AbstractContextManager[None]]
    logs: RunLogs
    view: ProgressView
    world: World = field(default_factory=World)  # one process unless torchrun started several
    on_eval: EvalHook | None = field(default_factory=_EVAL_HOOK.get)
    _dropouts: dict[int, DropoutControl] = field(default_factory=dict)
    dtype: torch.dtype | None = None  # the autocast dtype (None: fp32): what MFU's CPU peak is measured in

    def dropout_of(self, model: torch.nn.Module) -> DropoutControl:
        if id(model) not in self._dropouts:
            self._dropouts[id(model)] = DropoutControl(model)
        return self._dropouts[id(model)]
