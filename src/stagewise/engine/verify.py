"""`stagewise verify-resume`: train a shortened copy of the plan twice, once straight through and
once stopped midway and resumed, and name the first state that differs (if any)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file

from stagewise.config.optimizer_config import ScheduleConfig
from stagewise.config.plan_config import CheckpointConfig, Plan
from stagewise.engine.checkpoint import STATE, WEIGHTS, StageStore
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.errors import RunStopped
from stagewise.plan.tree import StageNode, stage_tree

# Absolute-step settings of a schedule, scaled with the stage when it is shortened.
_STEP_SETTINGS = ("warmup", "step_size", "decay")


@dataclass
class VerifyResult:
    stopped_at: int  # the plan step the interrupted run stopped after
    total_steps: int
    difference: str | None  # the first state that differs; None: bit-identical

    @property
    def identical(self) -> bool:
        return self.difference is None


def shortened(plan: Plan, steps: int, every: int) -> Plan:
    """The plan with each stage cut to at most `steps` updates (schedules scaled along), in fp32,
    checkpointing every `every` steps."""
    stages = []
    for node in stage_tree(plan):
        stage = node.config
        if stage.merge is not None:  # trains nothing: it averages what its shortened parent saves
            stages.append(plan.stages[node.index])
            continue
        total = stage.steps or steps  # epochs/tokens stages become `steps` long
        new = min(total, steps)
        stages.append(stage.model_copy(update={
            "steps": new, "epochs": None, "tokens": None,
            "schedule": _scale_schedule(stage.schedule, total, new),
            "from_": _scale_from(node, steps)}))
    return plan.model_copy(update={"stages": stages, "precision": "fp32", "compile": False,
                                   "checkpoint": CheckpointConfig(every=every, keep=2)})


def _scale_schedule(schedule: ScheduleConfig, old: int, new: int) -> ScheduleConfig:
    update: dict[str, Any] = {}
    for key in _STEP_SETTINGS:
        value = getattr(schedule, key)
        if isinstance(value, int) and value > 0:
            update[key] = max(1, min(new - 1, round(value * new / old)))
    if schedule.milestones is not None:
        update["milestones"] = [m if isinstance(m, float) else max(1, min(new, round(m * new / old)))
                                for m in schedule.milestones]
    return schedule.model_copy(update=update)


def _scale_from(node: StageNode, steps: int) -> str | None:
    """A branch point `NAME@STEP` moved with its parent's shortening."""
    if node.parent is None or node.at is None:
        return node.config.from_
    old = node.parent.config.steps or steps
    new = min(old, steps)
    return f"{node.parent.name}@{max(1, min(new, round(node.at * new / old)))}"


def verify_resume(plan: Plan, plan_path: Path, steps: int = 12, every: int = 3, stop_at: int | None = None) -> VerifyResult:
    short = shortened(plan, steps, every)
    with tempfile.TemporaryDirectory(prefix="stagewise-verify-") as tmp:
        root = Path(tmp)
        straight = prepare(short, plan_path, root / "cache-straight")
        total = straight.total_steps
        stop = stop_at if stop_at is not None else max(1, total // 2 + 1)
        quiet = Console(quiet=True)
        train(straight, root / "straight", console=quiet)
        try:
            train(prepare(short, plan_path, root / "cache-resumed"), root / "resumed", console=quiet, stop_after=stop)
        except RunStopped:
            pass
        resumed = prepare(short, plan_path, root / "cache-resumed")  # a new process would build anew
        train(resumed, root / "resumed", console=quiet)
        difference = state_difference(straight, resumed) or metrics_difference(root / "straight", root / "resumed")
        return VerifyResult(stop, total, difference)


def state_difference(a: Prepared, b: Prepared) -> str | None:
    """The first weight or optimizer-state tensor that differs between two stores' final checkpoints."""
    for stage in a.stages:
        dir_a = StageStore(a.cache_root, stage.key).final_dir
        dir_b = StageStore(b.cache_root, stage.key).final_dir
        weights_a, weights_b = load_file(dir_a / WEIGHTS), load_file(dir_b / WEIGHTS)
        for name in sorted(weights_a):
            if not torch.equal(weights_a[name], weights_b.get(name, torch.empty(0))):
                return f"stage '{stage.name}': weight {name}"
        opt_a = torch.load(dir_a / STATE, weights_only=True)["optimizer"]["state"]
        opt_b = torch.load(dir_b / STATE, weights_only=True)["optimizer"]["state"]
        for index in sorted(opt_a):
            for key, value in opt_a[index].items():
                other = opt_b.get(index, {}).get(key)
                same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
                if not same:
                    return f"stage '{stage.name}': optimizer state {key} of parameter {index}"
    return None


def metrics_difference(run_a: Path, run_b: Path) -> str | None:
    """The first logged number that differs (wall-clock figures aside)."""
    logged_a = [_numbers(m) for m in read_jsonl(run_a / "metrics.jsonl")]
    logged_b = [_numbers(m) for m in read_jsonl(run_b / "metrics.jsonl")]
    for line_a, line_b in zip(logged_a, logged_b, strict=False):
        if line_a != line_b:
            return f"metrics at plan step {line_a['step']}: {line_a} vs {line_b}"
    if len(logged_a) != len(logged_b):
        return f"metrics: {len(logged_a)} lines vs {len(logged_b)}"
    return None


def _numbers(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics line without its wall-clock figures, which no two runs share."""
    return {k: v for k, v in record.items() if k not in ("tok_per_s", "ex_per_s")}
