"""What every stage of one run shares: where it runs, at what precision, the logs; one dropout
control per model (it remembers the model's own rates, so it must outlive the stages); and the
user's callbacks (a search's pruner is one)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stagewise.config.plan_config import Plan
from stagewise.engine.callbacks import Callback
from stagewise.engine.distributed import World
from stagewise.engine.progress import ProgressView
from stagewise.engine.run_logs import RunLogs
from stagewise.models.build import DropoutControl


@dataclass
class RunContext:
    plan: Plan
    run_dir: Path
    device: torch.device
    autocast: Callable[[], AbstractContextManager[None]]
    logs: RunLogs
    view: ProgressView
    world: World = field(default_factory=World)  # one process unless torchrun started several
    callbacks: tuple[Callback, ...] = ()  # the user's, called after the built-in reactions that veto
    _dropouts: dict[int, DropoutControl] = field(default_factory=dict)
    dtype: torch.dtype | None = None  # the autocast dtype (None: fp32): what MFU's CPU peak is measured in

    def dropout_of(self, model: torch.nn.Module) -> DropoutControl:
        if id(model) not in self._dropouts:
            self._dropouts[id(model)] = DropoutControl(model)
        return self._dropouts[id(model)]
