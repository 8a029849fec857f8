"""stagewise: train language models with declared, resumable multi-stage optimization plans.

The public API (the command line is a thin caller of it)::

    import stagewise
    plan = stagewise.Plan.from_yaml("plan.yaml", overrides=["stages.cooldown.steps=800"])
    run = stagewise.train(plan, out="runs/demo", callbacks=[MyCallback()])
    run.stages["cooldown"].evals[-1]["val_loss"]; run.generate("ROMEO:")

Names are imported on first use, so `import stagewise` stays cheap (the command line's start-up)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that holds it
_EXPORTS = {
    "Plan": "stagewise.api.user_plan",
    "check": "stagewise.api.calls",
    "train": "stagewise.api.calls",
    "lr_find": "stagewise.api.calls",
    "search": "stagewise.api.calls",
    "open_run": "stagewise.api.calls",
    "Checked": "stagewise.api.calls",
    "Run": "stagewise.api.run_handle",
    "StageResult": "stagewise.api.run_handle",
    "Callback": "stagewise.engine.callbacks",
    "StepState": "stagewise.engine.callbacks",
    "register_callback": "stagewise.engine.callbacks",
    "CALLBACKS": "stagewise.engine.callbacks",
    "register_arch": "stagewise.config.registry",
    "register_optimizer": "stagewise.config.registry",
    "register_schedule": "stagewise.config.registry",
    "register_task": "stagewise.tasks.spec",
    "UserError": "stagewise.errors",
    "RunStopped": "stagewise.errors",
}

__all__ = ["CALLBACKS", "Callback", "Checked", "Plan", "Run", "RunStopped", "StageResult", "StepState", "UserError",
           "__version__", "check", "lr_find", "open_run", "register_arch", "register_callback", "register_optimizer",
           "register_schedule", "register_task", "search", "train"]

if TYPE_CHECKING:
    from stagewise.api.calls import Checked, check, lr_find, open_run, search, train
    from stagewise.api.run_handle import Run, StageResult
    from stagewise.api.user_plan import Plan
    from stagewise.config.registry import register_arch, register_optimizer, register_schedule
    from stagewise.engine.callbacks import CALLBACKS, Callback, StepState, register_callback
    from stagewise.errors import RunStopped, UserError
    from stagewise.tasks.spec import register_task


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stagewise' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
