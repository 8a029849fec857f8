"""One trial of a search: the plan with the sampled values put in, trained like any plan
(load -> validate -> prepare -> train) into DIR/trials/NNNN, with the search's one stage cache
DIR/.cache: the stages it shares with earlier trials (or with trials other workers are training
right now: the stage store's lock makes the second one wait) are reused, not trained again."""

from __future__ import annotations

import os
import socket
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from stagewise.engine.callbacks import Callback, StepState
from stagewise.engine.prepare_run import prepare
from stagewise.engine.reactions import EvalReporter
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.engine.rundir import make_run_directory
from stagewise.errors import RunStopped, UserError
from stagewise.plan.load import validate_plan
from stagewise.tasks.user_task import UserParts
from stagewise.tuning.cv import FoldData, fold_plan
from stagewise.tuning.objective import Objective
from stagewise.tuning.space import Param, sample, with_params

if TYPE_CHECKING:
    from stagewise.engine.loop import StageTrainer


@dataclass(frozen=True)
class SearchSetup:
    """Everything a worker process needs (it is pickled to spawned workers)."""

    plan_path: Path
    raw: dict[str, Any]  # the plan as read, before any trial's values
    space: list[Param]
    objective: Objective
    out: Path
    storage: str
    study: str
    trials: int
    workers: int
    sampler: str
    pruner: str
    seed: int
    folds: list[FoldData] | None  # --cv: the objective stage's data for each fold
    plugins: tuple[str, ...] = ()  # --plugin: imported first by each spawned worker
    # Objects passed from Python (one worker, in this process): the user's parts, callbacks, and the
    # model's weights as given, which every trial starts from (it trains the model object in place).
    parts: UserParts | None = None
    callbacks: tuple[Callback, ...] = ()
    start_weights: dict[str, torch.Tensor] | None = None

    @property
    def cache(self) -> Path:
        return self.out / ".cache"

    def trial_dir(self, number: int) -> Path:
        return self.out / "trials" / f"{number:04d}"


class Pruned(RunStopped):
    """The pruner stopped the trial at an evaluation: the run stops as on a signal (logged as
    plan_interrupted), then the trial is told pruned."""


def worker_id() -> dict[str, Any]:
    """What a running trial records of the process running it (user attr `worker`)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def run_trial(setup: SearchSetup, trial: Any, say: Callable[[str], None]) -> float:
    """Train the trial's plan (each fold's, with --cv) and return its objective value."""
    import optuna

    raw = with_params(setup.raw, sample(setup.space, trial))
    run_dir = setup.trial_dir(trial.number)
    trial.set_user_attr("run_dir", str(run_dir.relative_to(setup.out)))
    trial.set_user_attr("worker", worker_id())  # a search run again sees whether it is still running
    try:
        if setup.folds is None:
            return _train(setup, raw, run_dir, trial.number,
                          (EvalReporter(_reporter(setup.objective, trial)), TrialProgress(f"trial {trial.number}", say)))
        values: list[float] = []
        for k, fold in enumerate(setup.folds):
            values.append(_train(setup, fold_plan(raw, setup.objective.stage, fold), run_dir / f"fold-{k}",
                                 trial.number, (TrialProgress(f"trial {trial.number} fold {k}", say),)))
            trial.set_user_attr("cv_values", values)
            trial.report(statistics.fmean(values), k)  # the running mean after each fold
            if k + 1 < len(setup.folds) and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {k}: mean {setup.objective.metric} "
                                         f"{statistics.fmean(values):.4f}")
        trial.set_user_attr("cv_std", statistics.pstdev(values))
        return statistics.fmean(values)
    except Pruned as e:
        raise optuna.TrialPruned(str(e)) from None
    except UserError as e:  # a sampled combination the plan refuses: this trial fails, the search goes on
        trial.set_user_attr("error", str(e))
        say(f"trial {trial.number} failed: {e}")
        raise
    except (RunStopped, KeyboardInterrupt) as e:
        trial.set_user_attr("interrupted", str(e) or "interrupted")  # a resumed search runs it again
        raise
    finally:
        reused, trained = stages_of(run_dir)
        trial.set_user_attr("reused", reused)
        trial.set_user_attr("trained", trained)


def _train(setup: SearchSetup, raw: dict[str, Any], run_dir: Path, number: int,
           callbacks: tuple[Callback, ...] = ()) -> float:
    plan = validate_plan(raw, where=f"{setup.plan_path} (trial {number})")
    if setup.parts is not None and setup.parts.model is not None and setup.start_weights is not None:
        setup.parts.model.load_state_dict(setup.start_weights)  # as given: the same fingerprint, the same start
    prepared = prepare(plan, setup.plan_path, setup.cache, setup.parts)
    make_run_directory(run_dir)
    with (run_dir / "console.log").open("a", encoding="utf-8") as log:  # workers share one terminal
        summaries = train(prepared, run_dir, console=Console(file=log, width=160),
                          callbacks=(*callbacks, *setup.callbacks))
    summary = next(s for s in summaries if s.stage == setup.objective.stage)
    value = setup.objective.final_value(summary)
    if value is None:
        raise UserError(f"trial {number}", f"stage '{summary.stage}' ended without a finite "
                                           f"{setup.objective.metric}")
    return value


class TrialProgress(Callback):
    """The running trial's progress in the search's terminal (its own console goes to its
    console.log): a line as each stage starts, at each quarter of its updates, and at each evaluation."""

    QUARTERS = 4

    def __init__(self, trial: str, say: Callable[[str], None]) -> None:
        self.trial, self.say = trial, say

    def stage_start(self, trainer: StageTrainer) -> None:
        step = trainer.progress.step
        self.say(f"{self.trial}: stage '{trainer.stage.name}' {'resumes at step ' + str(step) if step else 'starts'} "
                 f"({trainer.stage.steps} updates)")

    def after_update(self, trainer: StageTrainer, update: StepState) -> None:
        step, steps = trainer.progress.step, trainer.stage.steps
        if step < steps and step * self.QUARTERS // steps != (step - 1) * self.QUARTERS // steps:
            loss = "" if update.loss is None else f", loss {float(update.loss):.4f}"
            self.say(f"{self.trial}: stage '{trainer.stage.name}' step {step}/{steps}{loss}")

    def after_evaluation(self, trainer: StageTrainer, metrics: dict[str, float]) -> str | None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
        self.say(f"{self.trial}: stage '{trainer.stage.name}' step {trainer.progress.step}/{trainer.stage.steps}: "
                 f"{shown}")
        return None


def _reporter(objective: Objective, trial: Any) -> Callable[[str, int, dict[str, float]], None]:
    """The evaluation hook: the objective stage's metric at each evaluation goes to the pruner."""
    def report(stage: str, step: int, metrics: dict[str, float]) -> None:
        value = objective.value_of(metrics)  # type: ignore[arg-type]
        if stage != objective.stage or value is None:
            return
        trial.report(value, step)
        if trial.should_prune():
            raise Pruned(f"trial {trial.number} pruned at step {step} of stage '{stage}': {objective.metric} "
                         f"{value:.4f}", code=0)
    return report


def stages_of(run_dir: Path) -> tuple[list[str], list[str]]:
    """The stages a trial's runs (its folds, with --cv) reused from the cache and trained, by
    their events.jsonl; fold runs are prefixed `fold-k/`."""
    reused: list[str] = []
    trained: list[str] = []
    logs = sorted(run_dir.glob("fold-*/events.jsonl")) or [run_dir / "events.jsonl"]
    for log in logs:
        if not log.is_file():
            continue
        prefix = f"{log.parent.name}/" if log.parent != run_dir else ""
        for event in read_jsonl(log):
            if event.get("event") == "stage_reused":
                reused.append(prefix + event["stage"])
            elif event.get("event") == "stage_start" and event.get("stage_step") == 0:
                trained.append(prefix + event["stage"])
    return reused, trained
