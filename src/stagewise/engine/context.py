"""What every stage of one run shares: the model, where it runs, the data, the logs."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    forward: Callable[..., Any]  # the model, or its torch.compile'd wrapper
    device: torch.device
    autocast: Callable[[], AbstractContextManager[None]]
    data: PreparedData
    dropout: DropoutControl
    logs: RunLogs
    view: ProgressView
