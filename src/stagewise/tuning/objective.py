"""What a search optimizes: a named metric of a named stage, from that stage's final evaluation
(the StageSummary a trial's run returns, the same numbers as its metrics.jsonl); and the check,
before any trial, that the stage logs that metric at all (its task spec's `metrics`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stagewise.config.plan_config import Plan
from stagewise.engine.progress import StageSummary
from stagewise.errors import UserError
from stagewise.tasks.spec import task_spec

_LOWER_IS_BETTER = ("loss", "ppl")
Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class Objective:
    stage: str
    metric: str
    direction: Direction

    def value_of(self, metrics: dict[str, float | None]) -> float | None:
        value = metrics.get(self.metric)
        return float(value) if value is not None and math.isfinite(value) else None

    def final_value(self, summary: StageSummary) -> float | None:
        """The metric at the stage's end (train_loss is the summary's own field)."""
        return self.value_of({**summary.metrics, "train_loss": summary.train_loss, "val_loss": summary.val_loss})

    def __str__(self) -> str:
        return f"{self.stage}.{self.metric}"


def objective_of(plan: Plan, text: str | None, direction: Direction | None) -> Objective:
    """`--metric STAGE.METRIC` (default: the last stage's val_loss) and `--direction` (default:
    minimize a loss or perplexity, maximize anything else), checked against the plan."""
    stages = {s.name: s for s in plan.stages}
    if text is None:
        stage, metric = plan.stages[-1].name, "val_loss"
    else:
        stage, _, metric = text.rpartition(".")  # stage names may hold dots, metric names do not
        if not stage or not metric:
            raise UserError("--metric", f"STAGE.METRIC, e.g. {plan.stages[-1].name}.val_loss (got '{text}')")
    if stage not in stages:
        raise UserError("--metric", f"no stage '{stage}' in the plan (stages: {', '.join(stages)})")
    logged = task_spec(stages[stage].task).reported(stages[stage].eval)  # with its eval.metrics
    if metric not in logged:
        raise UserError("--metric", f"stage '{stage}' ({stages[stage].task}) never logs '{metric}' "
                                    f"(it logs {', '.join(logged)})")
    if direction is None:
        direction = "minimize" if any(metric.endswith(s) for s in _LOWER_IS_BETTER) else "maximize"
    return Objective(stage, metric, direction)
