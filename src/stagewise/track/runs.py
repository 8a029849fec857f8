"""A run directory read back: its logs turned into what a person asks of a run (state, stages,
where it stopped), and `stagewise runs`, the list of the runs in a directory."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stagewise.config.data_config import MixSource
from stagewise.engine.progress import StageSummary
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.rundir import is_training
from stagewise.errors import UserError


@dataclass(frozen=True)
class StageSpan:
    """A stage's place on the plan's global step axis: updates start+1 .. end. A branch starts
    at its parent's step (`from: stable@100`: at stable's start + 100), beside its siblings."""

    name: str
    start: int
    end: int
    parent: str | None = None


@dataclass
class StageRow:
    """One line of a run's stage table; None where the logs do not tell (yet)."""

    name: str
    task: str | None
    optimizer: str | None
    schedule: str | None
    steps: int | None
    tokens: int | None
    seconds: float | None
    best_val_loss: float | None
    status: str  # trained | reused | stopped at step N | not run
    regularization: str | None = None  # the stage's L1, L2 and dropout, where set


@dataclass
class Run:
    path: Path
    events: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    plan_text: str | None  # plan.yaml as written, shown verbatim in the report

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def sample(self) -> str | None:
        """The text generated at the end of the run (plan key `sample`), when it was."""
        path = self.path / "sample.txt"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    @cached_property
    def plan(self) -> dict[str, Any]:
        try:
            loaded = yaml.safe_load(self.plan_text or "")
        except yaml.YAMLError:
            raise UserError(str(self.path / "plan.yaml"), "not valid YAML") from None
        return loaded if isinstance(loaded, dict) else {}

    def _named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    @cached_property
    def state(self) -> str:
        """running (a process holds the run's lock), complete, failed, or interrupted (also a run
        killed too hard to log it); lr-find for the folder of a finished LR range test (no
        training run); looked at once, like the logs the Run was loaded with."""
        if is_training(self.path):
            return "running"
        names = {e.get("event") for e in self.events}
        if "lr_find" in names and "plan_start" not in names:
            return "lr-find"
        if "plan_end" in names:
            return "complete"
        return "failed" if "plan_failed" in names else "interrupted"

    @property
    def lr_found(self) -> str:
        """What a finished LR range test suggested (its lr_find event)."""
        found = self._named("lr_find")[-1]
        shown = [f"{name} {found[key]:.2e}" for name, key in (("minimum / 10", "minimum"), ("steepest", "steep"))
                 if _finite(found.get(key))]
        return f"stage '{found.get('stage')}': " + (", ".join(shown) if shown else "no suggestion (no usable descent)")

    @property
    def error(self) -> str | None:
        failed = self._named("plan_failed")
        return str(failed[-1].get("error", "")) if failed else None

    @property
    def planned_stages(self) -> list[str]:
        """Stage names in plan order: from plan_start, else from plan.yaml."""
        start = self._named("plan_start")
        if start and isinstance(start[-1].get("stages"), list):
            return [str(s["name"]) if isinstance(s, dict) else str(s) for s in start[-1]["stages"]]
        return [str(s.get("name")) for s in self._plan_stages()]

    def _plan_stages(self) -> list[dict[str, Any]]:
        stages = self.plan.get("stages")
        return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []

    @property
    def done_stages(self) -> list[str]:
        """Stages finished in this run or reused from a cache, in log order."""
        return list(dict.fromkeys(e["stage"] for e in self.events
                                  if e.get("event") in ("stage_end", "stage_reused") and "stage" in e))

    @property
    def reused_stages(self) -> set[str]:
        return {e["stage"] for e in self._named("stage_reused") if "stage" in e}

    @property
    def best_val_loss(self) -> float | None:
        return self.best("val_loss")

    def best(self, metric: str) -> float | None:
        """The best evaluation of `metric` over the run: the lowest of a loss or perplexity, the
        highest of the others (accuracy, F1, BLEU, chrF). From the metrics when loaded, else from
        the eval events (the listing reads only events)."""
        source = self.metrics if self.metrics else self._named("eval")
        values = [float(r[metric]) for r in source if r.get("kind", "eval") == "eval" and _finite(r.get(metric))]
        if not values:
            return None
        return min(values) if lower_is_better(metric) else max(values)

    @property
    def last_time(self) -> float | None:
        times = [e["time"] for e in self.events if isinstance(e.get("time"), (int, float))]
        return max(times) if times else None

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.metrics + self.events if isinstance(r.get("step"), int)]
        return max(steps, default=0)

    @property
    def last_stage(self) -> str | None:
        started = [e.get("stage") for e in self.events if e.get("event") in ("stage_start", "stage_reused")]
        return started[-1] if started else None

    @property
    def stop_note(self) -> str | None:
        """Where an unfinished run stopped, and why when the log says; None for a complete run."""
        state = self.state
        if state == "complete":
            return None
        where = f"stopped at step {self.last_step}"
        if self.last_stage is not None:
            where += f" in stage '{self.last_stage}'"
        return f"{state}: {where}" + (f": {self.error}" if self.error else "")

    @cached_property
    def spans(self) -> list[StageSpan]:
        """Stages that started (or were reused with their place logged), latest entry per name; a
        stage ended early by `until` or a rule ends at that step. A resumed stage's start event is
        logged at the step it resumes from (its stage_step)."""
        parents = {e.get("stage"): e.get("parent") for e in self.events if e.get("event") == "stage_start"}
        start = self._named("plan_start")
        if start and isinstance(start[-1].get("stages"), list):
            parents.update({s["name"]: s.get("parent") for s in start[-1]["stages"] if isinstance(s, dict)})
        stopped = {e.get("stage"): e["step"] for e in self._named("stage_stopped_early")
                   if isinstance(e.get("step"), int)}
        found: dict[str, StageSpan] = {}
        for e in self.events:
            if e.get("event") in ("stage_start", "stage_reused") and isinstance(e.get("step"), int) \
                    and isinstance(e.get("steps"), int):
                first = e["step"] - (e["stage_step"] if isinstance(e.get("stage_step"), int) else 0)
                name = e["stage"]
                found[name] = StageSpan(name, first, stopped.get(name, first + e["steps"]), parents.get(name))
        return list(found.values())

    def event_step(self, event: dict[str, Any]) -> int:
        """The global step an event belongs to: its own, else its stage's start (a hand-off is logged
        just before stage_start), else the last step logged before it."""
        if isinstance(event.get("step"), int):
            return event["step"]
        span = next((s for s in self.spans if s.name == event.get("stage")), None)
        if span is not None:
            return span.start
        step = 0
        for e in self.events:
            if e is event:
                break
            if isinstance(e.get("step"), int):
                step = e["step"]
        return step

    def stage_rows(self) -> list[StageRow]:
        plan_stages = {str(s.get("name")): s for s in self._plan_stages()}
        # a reused stage has no stage_start; its stage_reused event says what it can
        starts = {e["stage"]: e for e in self.events
                  if e.get("event") in ("stage_start", "stage_reused") and "stage" in e}
        ends = {e["stage"]: e for e in self._named("stage_end") if "stage" in e}
        carried = {e.get("stage") for e in self._named("optimizer_carried")}
        reused = self.reused_stages
        rows = []
        for name in self.planned_stages:
            planned, start, end = plan_stages.get(name, {}), starts.get(name, {}), ends.get(name)
            steps = start.get("steps", planned.get("steps"))
            mine = [m for m in self.metrics if m.get("stage") == name]
            finished = end is not None or name in reused
            done = steps if finished else max((m.get("stage_step", 0) for m in mine), default=0)
            per_step = start.get("tokens_per_step")
            evals = [float(m["val_loss"]) for m in mine if _finite(m.get("val_loss"))]
            if name in reused:
                status = "reused"
            elif end is not None:
                status = "trained"
            elif start:
                status = f"stopped at step {start.get('step', 0) + done}"
            else:
                status = "not run"
            rows.append(StageRow(
                name=name, task=_task(planned), optimizer=_optimizer(planned, start, name in carried),
                schedule=_schedule(planned, start), steps=steps,
                tokens=end["tokens"] if end is not None and isinstance(end.get("tokens"), int) else
                per_step * done if isinstance(per_step, int) and isinstance(done, int) else None,
                seconds=end.get("seconds") if end else None,
                best_val_loss=min(evals) if evals else None, status=status,
                regularization=_regularization(planned)))
        return rows

    def summaries(self) -> list[StageSummary]:
        """The end-of-run table's rows, from the events: each stage trained or reused, in plan
        order. A reused stage's log holds its final val loss only (its summary is in the cache)."""
        plan_stages = {str(s.get("name")): s for s in self._plan_stages()}
        spans = {s.name: s for s in self.spans}
        plan_start = self._named("plan_start")
        resolved = {s.get("name"): s for s in (plan_start[-1].get("stages") or [] if plan_start else [])
                    if isinstance(s, dict)}
        rows = []
        for name in self.planned_stages:
            mine = [e for e in self.events if e.get("stage") == name]
            start = next((e for e in reversed(mine) if e.get("event") in ("stage_start", "stage_reused")), None)
            end = next((e for e in mine if e.get("event") in ("stage_end", "stage_reused")), None)
            if start is None or end is None or name not in spans:
                continue
            reused = end.get("event") == "stage_reused"
            evals = [e for e in mine if e.get("event") == "eval" and isinstance(e.get("step"), int)]
            last = evals[-1] if evals else {}
            steps = start.get("steps", 0) if reused or not last else last["step"] - spans[name].start
            optimizer = next((e["optimizer_to"] for e in reversed(mine) if e.get("optimizer_to")),
                             start.get("optimizer") or (plan_stages.get(name, {}).get("optimizer") or {}).get("name"))
            per_step = start.get("tokens_per_step")
            metrics = {k: float(v) for k, v in last.items() if k.startswith("val_") and _finite(v)}
            rows.append(StageSummary(
                stage=name, optimizer=str(optimizer or "-"), steps=steps,
                tokens=end["tokens"] if isinstance(end.get("tokens"), int) else
                per_step * steps if isinstance(per_step, int) else 0, seconds=float(end.get("seconds") or 0.0),
                train_loss=end.get("train_loss"), val_loss=end.get("val_loss"), reused=reused,
                unit=str(start.get("unit") or resolved.get(name, {}).get("unit") or "tokens"), metrics=metrics,
                **{k: float(end[k]) for k in ("per_second", "mfu", "peak_memory_gb") if _finite(end.get(k))}))
        return rows


def _task(planned: dict[str, Any]) -> str | None:
    """The stage's task, and its data mixture when it has one (each source's share)."""
    task, mix = planned.get("task"), (planned.get("data") or {}).get("mix")
    if not isinstance(mix, list) or not mix or task is None:
        return task
    try:
        sources = [MixSource.model_validate(m) for m in mix]
    except ValidationError:  # a plan.yaml edited by hand: the task alone
        return task
    total = sum(m.weight for m in sources) or 1.0
    return f"{task} (mix {', '.join(f'{m.label(i)} {m.weight / total:.0%}' for i, m in enumerate(sources))})"


def _optimizer(planned: dict[str, Any], start: dict[str, Any], carried: bool) -> str | None:
    """The resolved name and LR (stage_start) over the plan's, which may inherit both."""
    given = planned.get("optimizer") or {}
    name = start.get("optimizer") or given.get("name")
    lr = (start.get("settings") or {}).get("lr", given.get("lr"))
    if name is None:
        return None
    return name + (f" lr={lr:.2e}" if isinstance(lr, (int, float)) else "") + (" (carried)" if carried else "")


def _regularization(planned: dict[str, Any]) -> str | None:
    """The stage's penalties and dropout as its plan.yaml sets them (zero and unset left out)."""
    given = planned.get("regularization") or {}
    shown = [f"{k}={v:.4g}" for k in ("l1", "l2", "dropout") if isinstance(v := given.get(k), (int, float)) and v]
    return " ".join(shown) or None


def _schedule(planned: dict[str, Any], start: dict[str, Any]) -> str | None:
    given = planned.get("schedule") or {}
    name = start.get("schedule") or given.get("name")
    settings = " ".join(f"{k}={v}" for k, v in given.items() if k != "name" and v is not None)
    return f"{name} {settings}".strip() if name else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("loss", "ppl"))


def load_run(path: Path, with_metrics: bool = True) -> Run:
    """A run directory; bad input (not a run, no metrics to show) is one line."""
    if not (path / "events.jsonl").is_file():
        raise UserError(str(path), "not a run directory (no events.jsonl)")
    metrics: list[dict[str, Any]] = []
    if with_metrics:
        if not (path / "metrics.jsonl").is_file():
            raise UserError(str(path), "no metrics.jsonl: nothing to report")
        metrics = read_jsonl(path / "metrics.jsonl")
    plan = path / "plan.yaml"
    return Run(path, read_jsonl(path / "events.jsonl"), metrics,
               plan.read_text(encoding="utf-8") if plan.is_file() else None)


def find_runs(directory: Path) -> list[Run]:
    """Every run below `directory` (nested too: a search keeps its trials in one folder), the
    most recently updated first (runs without a timestamp last, by path)."""
    if not directory.is_dir():
        raise UserError(str(directory), "no such directory")
    runs = [load_run(p.parent, with_metrics=False) for p in sorted(directory.rglob("events.jsonl"))]
    return sorted(runs, key=lambda r: -r.last_time if r.last_time is not None else math.inf)


_STATE_STYLE = {"running": "cyan", "complete": "green", "failed": "red", "interrupted": "yellow", "lr-find": "blue"}


def print_runs(console: Console, directory: Path, runs: list[Run], metric: str | None = None) -> None:
    """`metric`: a column with each run's best evaluation of it, besides the best val loss."""
    if not runs:
        console.print(f"no runs in {directory}")
        return
    if metric is not None and all(run.best(metric) is None for run in runs):
        logged = sorted({k for run in runs for e in run.events if e.get("event") == "eval"
                         for k in e if k.startswith("val_")})
        raise UserError("--metric", f"no run in {directory} has evaluated '{metric}' (evaluated: "
                                    f"{', '.join(logged) or 'nothing yet'})")
    metrics = ["val_loss"] + ([metric] if metric not in (None, "val_loss") else [])
    table = Table(title=f"runs in {directory}, the latest first")
    numbers = ["stages"] + [f"best {m.replace('_', ' ')}" for m in metrics]
    for col in ("run", "state", *numbers, "last update"):
        table.add_column(col, justify="right" if col in numbers else "left")
    now = time.time()
    for run in runs:
        where = run.path.relative_to(directory)
        bests = [run.best(m) for m in metrics]
        last = "-" if run.last_time is None else when(run.last_time, now)
        name = str(where) if where.parts else run.name
        if run.state == "lr-find":  # an LR range test trains no stages: what it suggested instead
            table.add_row(name, f"[{_STATE_STYLE[run.state]}]lr-find[/] {escape(run.lr_found)}", "-",
                          *("-" for _ in bests), last)
            continue
        table.add_row(name, f"[{_STATE_STYLE[run.state]}]{run.state}[/]",
                      f"{len(run.done_stages)}/{len(run.planned_stages)}",
                      *("-" if b is None else f"{b:.4f}" for b in bests), last)
    console.print(table)


def when(t: float, now: float) -> str:
    """A timestamp for people: the local date and time, and how long ago."""
    ago = max(0.0, now - t)
    if ago < 60:
        rel = "just now"
    elif ago < 3600:
        rel = f"{int(ago // 60)} min ago"
    elif ago < 86400:
        rel = f"{int(ago // 3600)} h ago"
    else:
        rel = f"{int(ago // 86400)} d ago"
    return f"{datetime.fromtimestamp(t):%Y-%m-%d %H:%M} ({rel})"
