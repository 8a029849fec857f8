"""What a Python user (and the command line, a thin caller of these) does with a plan: check it,
train it, find a stage's learning rate, search over it, open a run."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from stagewise.api.read_runs import report
from stagewise.api.run_handle import Run
from stagewise.api.user_plan import Plan
from stagewise.engine.callbacks import Callback, check_callbacks
from stagewise.engine.distributed import joined
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_plan import train as train_plan
from stagewise.engine.rundir import check_run_directory
from stagewise.engine.status import stage_status
from stagewise.errors import UserError
from stagewise.plan.load import blame_overrides, read_yaml
from stagewise.plan.resolved import ResolvedStage
from stagewise.tasks.user_task import PLACEHOLDER, TASK, Loss, UserParts
from stagewise.tuning.lr_find import LrFindResult
from stagewise.tuning.lr_find import lr_find as find_lr
from stagewise.tuning.run_search import SearchOptions, SearchResult
from stagewise.tuning.run_search import search as run_search

PlanLike = Plan | str | Path | Mapping[str, Any]


def as_plan(plan: PlanLike, overrides: Sequence[str] = (), parts: UserParts | None = None) -> Plan:
    """A Plan, a YAML file's path or a dict; `overrides` applied. With objects passed from Python
    (`parts`), what they stand for may be left out of the plan (its `model`; the `tokenizer` and
    `data` of rows a loss reads, `task: python` then every stage's default)."""
    if isinstance(plan, Plan):
        raw, path, base = plan.raw, plan.path, plan.base_dir
        overrides = (*plan.overrides, *overrides) if parts is not None else overrides
        if parts is None:
            return plan.with_overrides(*overrides) if overrides else plan
    elif isinstance(plan, (str, Path)):
        raw, path, base = read_yaml(Path(plan)), Path(plan), None
        if parts is None:
            return Plan.from_yaml(path, overrides)
    elif isinstance(plan, Mapping):
        raw, path, base = dict(plan), None, None
    else:
        raise UserError("plan", f"a stagewise.Plan, a YAML file's path or a dict, not {type(plan).__name__}")
    if parts is not None:
        raw = {**raw}
        if parts.model is not None:
            raw.setdefault("model", {"arch": PLACEHOLDER})
        if parts.loss is not None:
            raw.setdefault("tokenizer", {"kind": "word"})
            raw.setdefault("data", {"train": PLACEHOLDER})
            raw["defaults"] = {"task": TASK, **(raw.get("defaults") or {})}
    return Plan(raw, path=path, base_dir=base, overrides=overrides)


@dataclass
class Checked:
    """A checked plan: its stages resolved (steps, LR, keys) and what `train` would do with each."""

    plan: Plan
    prepared: Prepared
    status: dict[str, str]  # stage -> reuse | resume at step N | train
    out: Path  # the run directory train would use

    @property
    def stages(self) -> list[ResolvedStage]:
        return self.prepared.resolved


def _parts(model: nn.Module | None, data: Mapping[str, Any] | None, loss: Loss | None) -> UserParts | None:
    if model is None and data is None and loss is None:
        return None
    parts = UserParts(model, data, loss)
    parts.check_objects()  # before the plan, which may leave out what they stand for
    return parts


def _path(path: str | Path | None) -> Path | None:
    """A path argument as the caller gave it: a str or a Path (None: the default applies)."""
    return None if path is None else Path(path)


def _prepare(plan: Plan, out: str | Path | None, cache: str | Path | None, parts: UserParts | None,
             fresh: bool | None = None) -> tuple[Prepared, Path]:
    """The plan prepared, and the run directory: `out`, else runs/<plan name>; the cache: `cache`,
    else .cache beside the run directory. `fresh` (train): the run directory checked first."""
    run_dir = _path(out) or Path("runs") / plan.name
    if fresh is not None and os.environ.get("RANK", "0") == "0":  # torchrun's other ranks would meet rank 0's lock
        check_run_directory(run_dir, fresh)
    try:
        return prepare(plan.config, plan.file, _path(cache) or run_dir.parent / ".cache", parts), run_dir
    except UserError as e:
        raise blame_overrides(e, plan.where, plan.typed) from None


def check(plan: PlanLike, *, out: str | Path | None = None, cache: str | Path | None = None, model: nn.Module | None = None,
          data: Mapping[str, Any] | None = None, loss: Loss | None = None) -> Checked:
    """Validate the plan and prepare it (data read, models built) without training; which stages
    the cache of `out` (or `cache`) would reuse or resume."""
    parts = _parts(model, data, loss)
    plan = as_plan(plan, parts=parts)
    prepared, run_dir = _prepare(plan, out, cache, parts)
    return Checked(plan, prepared, stage_status(prepared), run_dir)


def train(plan: PlanLike, *, out: str | Path | None = None, cache: str | Path | None = None, fresh: bool = False,
          callbacks: Sequence[Callback] = (), model: nn.Module | None = None, data: Mapping[str, Any] | None = None,
          loss: Loss | None = None, track: Sequence[str | Mapping[str, Any]] | None = None,
          console: Console | None = None, command: str | None = None) -> Run:
    """Run (or resume) the whole plan into `out` (default runs/<plan name>) and return the run.

    `model`: a torch module whose forward returns logits (or a transformers PreTrainedModel) in
    place of the plan's `model`; it is trained in place. `data`: rows ({"train": rows, "val":
    rows}, or per stage {stage name: {...}}) that `loss(model, batch) -> scalar` trains on (the
    stages' task is then `python`; tasks.user_task says what rows may be). Each object takes part
    in the stage keys by its fingerprint (tasks.user_task: what is fingerprinted and what is not).
    `callbacks`: stagewise.Callback instances called in every stage trained (not in reused ones).
    `track`: the experiment trackers, as the plan's `track:` key says them (`["mlflow", {"wandb":
    {"project": "p"}}]`), in place of the plan's. `fresh`: start over, forgetting this run and its
    stages' cache. `command`: what the message of a stopped run says to run to resume (the CLI
    passes its command line as typed); by default `stagewise train PLAN --out OUT --cache CACHE`.
    Under torchrun, every process calls this; rank 0 writes."""
    parts = _parts(model, data, loss)
    plan = as_plan(plan, parts=parts)
    if track is not None:
        plan = Plan({**plan.raw, "track": list(track)}, path=plan.path, base_dir=plan.base_dir)
    checked = check_callbacks(callbacks)
    console = console or Console()
    with joined() as world:  # the processes torchrun started, if it did
        if not world.is_main:  # rank 0 speaks for all
            console = Console(file=io.StringIO())
        with world.main_first():  # rank 0 fills the token cache, the others read it
            prepared, run_dir = _prepare(plan, out, cache, parts, fresh=fresh)
        train_plan(prepared, run_dir, fresh=fresh, console=console, world=world, callbacks=checked, report=report,
                   command=command)
    return Run.open(run_dir)


def lr_find(plan: PlanLike, stage: str, *, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            out: str | Path | None = None, cache: str | Path | None = None, write: str | Path | None = None,
            suggestion: str = "minimum", model: nn.Module | None = None, data: Mapping[str, Any] | None = None,
            loss: Loss | None = None, console: Console | None = None) -> LrFindResult:
    """The LR range test of `stage` from its starting weights (its parents trained or reused);
    `write`: a copy of the plan with the stage's optimizer.lr set to the suggestion. `model`,
    `data`, `loss`: as for `train`, with the same stage keys (the parents it trains are reused by
    a later `train`); a model object ends with the weights it was given."""
    parts = _parts(model, data, loss)
    plan = as_plan(plan, parts=parts)
    return find_lr(plan.file, [], stage, start=start, end=end, steps=steps, out=_path(out), cache=_path(cache),
                   write=_path(write), suggestion=suggestion, console=console, raw=plan.raw, parts=parts)


def search(plan: PlanLike, space: str | Path, *, trials: int, workers: int = 1, storage: str | None = None,
           study: str | None = None, out: str | Path | None = None, metric: str | None = None,
           direction: str | None = None, pruner: str = "median", sampler: str = "tpe", cv: int | None = None,
           plugins: tuple[str, ...] = (), model: nn.Module | None = None, data: Mapping[str, Any] | None = None,
           loss: Loss | None = None, callbacks: Sequence[Callback] = (), console: Console | None = None) -> SearchResult:
    """A hyperparameter search (Optuna) over plan keys: `space` a SPACE.yaml file (key path ->
    {float: [lo, hi]} | {int: [lo, hi]} | {choice: [...]}); trials share stages through the cache.
    `model`, `data`, `loss`, `callbacks`: as for `train` (every trial starts from the model's
    weights as given, which it has again at the end); objects live in this process, so a search
    with them runs with `workers=1`."""
    parts = _parts(model, data, loss)
    plan = as_plan(plan, parts=parts)
    options = SearchOptions(space=Path(space), trials=trials, workers=workers, storage=storage, study=study, out=_path(out),
                            metric=metric, direction=direction, pruner=pruner, sampler=sampler,  # type: ignore[arg-type]
                            cv=cv, plugins=plugins, parts=parts, callbacks=check_callbacks(callbacks))
    return run_search(plan.file, options, console or Console(), raw=plan.raw)


def open_run(path: str | Path) -> Run:
    """A run directory: its stages, metrics rows, events and exports; generate and evaluate."""
    return Run.open(Path(path))
