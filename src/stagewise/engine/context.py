"""What every stage of one run shares: the model, where it runs, the data, the logs."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from stagewise.data.prepare import PreparedData
from stagewise.models.build import DropoutControl
from stagewise.plan.schema import Plan
from stagewise.track.logs import RunLogs
from stagewise.track.progress import ProgressView


@dataclass
class RunContext:
    plan: Plan
    run_dir: Path
    model: PreTrainedModel
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> mean loss; compiled or not
    device: torch.device
    autocast: Callable[[], AbstractContextManager[None]]
    data: PreparedData
    dropout: DropoutControl
    logs: RunLogs
    view: ProgressView
