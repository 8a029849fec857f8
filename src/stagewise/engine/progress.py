"""Progress for people: two rich bars (plan, stage) on a terminal, plain log lines otherwise,
and the summary table at the end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


@dataclass
class StageSummary:
    stage: str
    optimizer: str
    steps: int
    tokens: int
    seconds: float
    train_loss: float | None
    val_loss: float | None
    reused: bool = False  # taken from the stage cache, not trained in this run
    unit: str = "tokens"  # what `tokens` counts: tokens (causal_lm) or examples
    metrics: dict[str, float] = field(default_factory=dict)  # the final evaluation's task metrics
    # How the device was used while training (engine.utilization); None when not trained in this run
    per_second: float | None = None  # tokens (or examples) a second per device
    mfu: float | None = None  # model FLOPs utilization: a fraction of the device's bf16 peak
    peak_memory_gb: float | None = None  # CUDA: the most allocated; CPU: the process's peak RSS

    def utilization(self) -> dict[str, float]:
        """The figures known, rounded for the logs (a stage_end event's)."""
        known = {"per_second": self.per_second, "mfu": self.mfu, "peak_memory_gb": self.peak_memory_gb}
        return {k: round(v, 4) for k, v in known.items() if v is not None}

    @property
    def perplexity(self) -> float | None:
        if self.unit != "tokens" and "val_ppl" not in self.metrics:
            return None
        return math.exp(self.val_loss) if self.val_loss is not None and self.val_loss < 50 else None

    def task_metrics(self) -> str:
        """The final evaluation's metrics beyond loss and perplexity (accuracy, F1, BLEU, ...)."""
        return ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in self.metrics.items()
                         if k not in ("val_loss", "val_ppl")) or "-"


class ProgressView:
    def __init__(self, total_steps: int, console: Console | None = None) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal
        self._progress: Progress | None = None
        self._plan_task: TaskID | None = None
        self._stage_task: TaskID | None = None
        self.total_steps = total_steps
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description:<18}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console)
            self._progress.start()
            self._plan_task = self._progress.add_task("plan", total=total_steps, info="")

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def stage_start(self, name: str, steps: int, at: int = 0) -> None:
        """A stage starts (`at` 0) or resumes at step `at`."""
        if self._progress is not None:
            if self._stage_task is not None:
                self._progress.remove_task(self._stage_task)
            self._stage_task = self._progress.add_task(name, total=steps, info="", completed=at)
        elif at == 0:
            self.print(f"[{name}] start: {steps} steps")

    def step(self, stage: str, stage_step: int, steps: int, global_step: int, info: dict[str, Any]) -> None:
        """Called once per logged step (not every step: the console is not free)."""
        text = _format_info(info)
        if self._progress is not None:
            assert self._stage_task is not None and self._plan_task is not None
            self._progress.update(self._stage_task, completed=stage_step, info=text)
            self._progress.update(self._plan_task, completed=global_step)
        else:
            self.print(f"[{stage}] step {stage_step}/{steps} (plan {global_step}/{self.total_steps}) {text}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def summary(self, rows: list[StageSummary]) -> None:
        table = Table(title="stages")
        columns, cells = summary_table(rows)
        for col in columns:
            table.add_column(col, justify="left" if col in SUMMARY_TEXT_COLUMNS else "right")
        for row in cells:
            table.add_row(*row)
        self.console.print(table)


SUMMARY_TEXT_COLUMNS = ("stage", "optimizer", "val metrics")  # the others are numbers, right-aligned


def summary_table(rows: list[StageSummary]) -> tuple[list[str], list[list[str]]]:
    """The end-of-run table (the console's, and the report's): column names and cells."""
    tasks = any(r.metrics.keys() - {"val_loss", "val_ppl"} for r in rows)
    used = any(r.per_second is not None for r in rows)
    columns = ["stage", "optimizer", "steps", "seen", "time", "train loss", "val loss", "val ppl"]
    cells = [[r.stage, r.optimizer, str(r.steps), f"{r.tokens:,} {'tok' if r.unit == 'tokens' else 'ex'}",
              "reused" if r.reused else f"{r.seconds:.1f}s", _num(r.train_loss), _num(r.val_loss),
              _num(r.perplexity, 2), *(_used(r) if used else ()), *((r.task_metrics(),) if tasks else ())]
             for r in rows]
    return columns + (["per s/device", "MFU", "peak mem"] if used else []) + (["val metrics"] if tasks else []), cells


def _used(r: StageSummary) -> tuple[str, str, str]:
    """A stage's device figures: its rate per device, MFU, peak memory, from the values as the
    stage_end event logs them (rounded), so a table rebuilt from the logs shows the same cells:
    0.02749 printed and 0.0275 logged were 2.7% and 2.8%."""
    used = r.utilization()
    rate = "-" if "per_second" not in used else f"{used['per_second']:,.0f} {'tok' if r.unit == 'tokens' else 'ex'}"
    return (rate, "-" if "mfu" not in used else f"{100 * used['mfu']:.1f}%",
            "-" if "peak_memory_gb" not in used else f"{used['peak_memory_gb']:.2f} GB")


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _format_info(info: dict[str, Any]) -> str:
    parts = []
    for key, value in info.items():
        if value is None:
            continue
        if key == "lr":
            parts.append(f"lr {value:.2e}")
        elif key == "tok_per_s":
            parts.append(f"{value / 1000:.1f}k tok/s")
        elif key == "ex_per_s":
            parts.append(f"{value:.0f} ex/s")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return " ".join(parts)
