"""A stage's metrics lines (metrics.jsonl, the `eval` event) and what the console shows of them;
its utilization figures for its summary."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from stagewise.engine.context import RunContext
from stagewise.engine.device import flops_per_token, model_shape
from stagewise.engine.utilization import Utilization, utilization
from stagewise.plan.resolved import ResolvedStage


def _line(stage: ResolvedStage, step: int, attempt: int) -> dict[str, Any]:
    """The start of a metrics line: the plan's step first; the rollback attempt when there was one."""
    return {"step": stage.start_step + step, "stage": stage.name, "stage_step": step,
            **({"attempt": attempt} if attempt else {})}


def log_train_line(run: RunContext, stage: ResolvedStage, unit: str, step: int, attempt: int, lr: float,
                   loss: float, grad_norm: float, timed_steps: int, seconds: float) -> None:
    """The train line at stage step `step`; the rate over the `timed_steps` updates of `seconds`."""
    timed = stage.tokens_before(step) - stage.tokens_before(step - timed_steps)
    info = {"lr": lr, "loss": loss, "grad_norm": grad_norm,
            ("tok_per_s" if unit == "tokens" else "ex_per_s"): timed / max(seconds, 1e-9)}
    line = _line(stage, step, 0)
    run.logs.metric("train", **line, **{unit: stage.start_tokens + stage.tokens_before(step)},
                    batch=stage.sequences_at(step - 1), **({"attempt": attempt} if attempt else {}), **info)
    run.view.step(stage.name, step, stage.steps, stage.start_step + step, info)


def log_eval_line(run: RunContext, stage: ResolvedStage, step: int, attempt: int, metrics: dict[str, float]) -> None:
    logged = {k: (v if math.isfinite(v) and not (k == "val_ppl" and metrics["val_loss"] >= 50) else None)
              for k, v in metrics.items()}  # JSON has no infinity
    run.logs.metric("eval", **_line(stage, step, attempt), **logged)
    run.logs.event("eval", stage=stage.name, step=stage.start_step + step, **logged)
    shown = ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in logged.items()
                      if v is not None and k != "val_loss")
    run.view.print(f"[{stage.name}] eval at step {step}: val loss {metrics['val_loss']:.4f}"
                   + (f", {shown}" if shown else ""))


def stage_utilization(run: RunContext, stage: ResolvedStage, model: nn.Module, unit: str, first: int, step: int,
                      seconds: float) -> Utilization | None:
    """The stage's rate per device, MFU and peak memory over the updates this process trained
    (`first` to `step`, `seconds` in train_step; engine.utilization); None when it trained none."""
    trained = stage.tokens_before(step) - stage.tokens_before(first)
    if trained <= 0 or seconds <= 0:
        return None
    flops = flops_per_token(*model_shape(model), stage.block_size) if unit == "tokens" else None
    return utilization(trained, seconds, run.world.size, flops, run.device, run.dtype)
