"""`stagewise search`: everything checked before any trial runs (the space against the plan, the
metric against what the stage logs, the folds), then the workers, then the table of trials, the
best plan and the plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from stagewise.engine.callbacks import Callback
from stagewise.errors import UserError
from stagewise.plan.load import read_yaml, validate_plan
from stagewise.tasks.user_task import UserParts
from stagewise.tuning.cv import write_folds
from stagewise.tuning.objective import Direction, objective_of
from stagewise.tuning.results import SETTINGS, TrialRow, edge_notes, print_trials, trial_rows, write_best, write_plots
from stagewise.tuning.space import check_space, every_param, key_of, load_space, override
from stagewise.tuning.study import local_storage, open_study, remaining, retry_interrupted, run_workers
from stagewise.tuning.trial import SearchSetup


@dataclass(frozen=True)
class SearchOptions:
    space: Path
    trials: int
    workers: int = 1
    storage: str | None = None  # default: sqlite:///DIR/study.db
    study: str | None = None  # default: the plan's name
    out: Path | None = None  # default: runs/<plan name>-search
    metric: str | None = None  # STAGE.METRIC; default: the last stage's val_loss
    direction: Direction | None = None  # default: minimize a loss, maximize anything else
    pruner: str = "median"
    sampler: str = "tpe"
    cv: int | None = None
    plugins: tuple[str, ...] = ()  # --plugin: what each worker process imports first
    parts: UserParts | None = None  # a Python caller's model, rows and loss (one worker only)
    callbacks: tuple[Callback, ...] = ()  # a Python caller's, called in every trial's stages


@dataclass(frozen=True)
class SearchResult:
    out: Path
    rows: list[TrialRow]
    best: Path | None  # best.yaml, once a trial completed
    plots: dict[str, Path]
    notes: list[str]


def search(plan_path: Path, options: SearchOptions, console: Console, raw: dict[str, Any] | None = None) -> SearchResult:
    """`raw`: the plan as read (stagewise.Plan), in place of reading `plan_path`."""
    setup = prepare_search(plan_path, options, raw)
    try:
        return _search(setup, console)
    finally:
        if setup.start_weights is not None:
            assert setup.parts is not None and setup.parts.model is not None
            setup.parts.model.load_state_dict(setup.start_weights)  # the model object ends as it was given


def _search(setup: SearchSetup, console: Console) -> SearchResult:
    study = open_study(setup)
    again = retry_interrupted(study)
    if again:
        console.print(f"{again} interrupted trial(s) queued to run again with the same values")
    left = remaining(study, setup.trials)
    console.print(f"search '{setup.study}': {setup.trials} trials ({left} to run), {setup.workers} worker(s), "
                  f"objective {setup.objective} ({setup.objective.direction}), storage {setup.storage}",
                  markup=False, highlight=False)
    if left:
        run_workers(setup, console)
    return summarize(setup, console)


def prepare_search(plan_path: Path, options: SearchOptions, raw: dict[str, Any] | None = None) -> SearchSetup:
    """Every check that needs no training, then the search directory's settings (and folds)."""
    if options.trials < 1 or options.workers < 1:
        raise UserError("--trials" if options.trials < 1 else "--workers", "must be >= 1")
    objects = options.parts is not None or bool(options.callbacks)
    if objects and options.workers > 1:
        raise UserError("workers", f"{options.workers}: objects passed from Python (model, data, loss, callbacks) live "
                                   "in this process, which other workers cannot share: search with workers=1")
    if options.parts is not None and options.parts.data is not None and options.cv is not None:
        raise UserError("cv", "folds split the plan's data files, not rows passed from Python: pass each fold's "
                              "rows yourself")
    raw = read_yaml(plan_path) if raw is None else raw
    plan = validate_plan(raw, where=str(plan_path))
    space = load_space(options.space)
    check_space(space, raw, plan_path, options.space)
    objective = objective_of(plan, options.metric, options.direction)
    out = options.out or Path("runs") / f"{plan.name}-search"
    if out.exists() and not out.is_dir():
        raise UserError("--out", f"{out} is a file")
    study = options.study or plan.name
    storage = options.storage or local_storage(out)
    settings = {"plan": str(plan_path.resolve()), "space": {p.name: [p.kind, p.low, p.high, p.log, list(p.choices)]
                                                            for p in every_param(space)},
                "metric": str(objective), "direction": objective.direction, "cv": options.cv, "study": study,
                "storage": storage}
    _check_same_search(out, settings)
    folds = write_folds(plan, plan_path, objective.stage, options.cv, out) if options.cv is not None else None
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return SearchSetup(plan_path=plan_path, raw=raw, space=space, objective=objective, out=out,
                       storage=storage, study=study, trials=options.trials,
                       workers=options.workers, sampler=options.sampler, pruner=options.pruner, seed=plan.seed,
                       folds=folds, plugins=options.plugins, parts=options.parts, callbacks=options.callbacks,
                       start_weights=_weights(options.parts))


def _weights(parts: UserParts | None) -> dict[str, torch.Tensor] | None:
    """The weights of a model passed from Python, as given: every trial starts from them."""
    if parts is None or parts.model is None:
        return None
    return {k: v.detach().clone() for k, v in parts.model.state_dict().items()}


def _check_same_search(out: Path, settings: dict[str, Any]) -> None:
    """A search directory resumes the search it holds, not another one."""
    path = out / SETTINGS
    if not path.is_file():
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    for key in ("plan", "space", "metric", "direction", "cv", "study", "storage"):
        if before.get(key) != settings[key]:
            raise UserError(str(out), f"holds a search with another {key} ({json.dumps(before.get(key))[:60]}); "
                                      "resume it as it was, or use another --out")


def summarize(setup: SearchSetup, console: Console) -> SearchResult:
    study = open_study(setup)
    rows = trial_rows(study)
    print_trials(console, rows, str(setup.objective))
    done = sum(r.state in ("complete", "pruned") for r in rows)
    if done < setup.trials:  # a running trial is not a done one
        running = sum(r.state == "running" for r in rows)
        console.print(f"{done} of {setup.trials} trials done" + (f", {running} running (other workers: run the "
                      "search again once they end)" if running else "; run the search again to go on"),
                      markup=False, highlight=False)
    best = write_best(setup.out, setup.raw, setup.plan_path, study)
    plots, notes = write_plots(study, setup.out)
    notes += edge_notes(study.best_trial.params, setup.space) if best is not None else []
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    if best is not None:
        b = study.best_trial
        overrides = " ".join(override(key_of(k), v) for k, v in b.params.items())
        console.print(f"best: trial {b.number}, {setup.objective.metric} {b.value:.4f}; plan written to {best} "
                      f"(= stagewise train {setup.plan_path} {overrides})", markup=False, highlight=False)
    return SearchResult(setup.out, rows, best, plots, notes)
