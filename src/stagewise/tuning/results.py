"""What a search leaves: the table of its trials (values, states, which stages each reused from
the stage cache), the best trial's plan as YAML, and Optuna's history and parameter-importance
plots (optuna.visualization.matplotlib), for the terminal and for `stagewise report`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from stagewise.plan.relocate import relocated
from stagewise.tuning.space import EDGE, Param, every_param, with_params

SETTINGS = "search.json"  # in the search directory: what it searches and where its study is
BEST = "best.yaml"
# Optuna's importances (fANOVA) fit a forest to the completed trials: from fewer than this many
# they rank the parameters by chance about as often as by effect.
MIN_IMPORTANCE_TRIALS = 10


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str  # complete | pruned | fail | running | waiting
    value: float | None
    params: dict[str, Any]
    reused: list[str]
    trained: list[str]
    cv_std: float | None
    note: str  # why it failed or was interrupted

    def cells(self) -> list[str]:
        params = ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        value = "-" if self.value is None else f"{self.value:.4f}"
        if self.cv_std is not None:
            value += f" ± {self.cv_std:.4f}"
        return [str(self.number), params, value, self.state, ", ".join(self.reused) or "-",
                ", ".join(self.trained) or "-", self.note]


HEADERS = ["trial", "params", "value", "state", "reused", "trained", "note"]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_rows(study: Any) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if attrs.get("surplus"):  # begun when the study was full (two workers at once): never ran
            continue
        note = attrs.get("error") or attrs.get("interrupted") or (f"retry of {attrs['retry_of']}"
                                                                  if "retry_of" in attrs else "")
        rows.append(TrialRow(t.number, t.state.name.lower(), t.value, dict(t.params), list(attrs.get("reused", [])),
                             list(attrs.get("trained", [])), attrs.get("cv_std"), note))
    return rows


def print_trials(console: Console, rows: list[TrialRow], metric: str) -> None:
    table = Table(title=f"trials ({metric})")
    for header in HEADERS:
        table.add_column(header, justify="right" if header in ("trial", "value") else "left")
    for row in rows:
        table.add_row(*row.cells())
    console.print(table)


def best_trial(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def write_best(out: Path, raw: dict[str, Any], plan_path: Path, study: Any) -> Path | None:
    """The best trial's plan: the plan with its values put in, its relative paths rewritten to
    name the same files from `out`, so that `stagewise check/train OUT/best.yaml` run as they are."""
    best = best_trial(study)
    if best is None:
        return None
    path = out / BEST
    header = (f"# best of search '{study.study_name}': trial {best.number}, value {best.value:.6g}\n"
              f"# the plan {plan_path} with {json.dumps(best.params)}; its relative paths are rewritten "
              "relative to this file's folder\n")
    plan = relocated(with_params(raw, best.params), plan_path.parent, out)
    path.write_text(header + yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    return path


def edge_notes(params: dict[str, Any], space: list[Param]) -> list[str]:
    """A note for each best value at an end of its range: the best may lie beyond it."""
    notes = []
    by_name = {p.name: p for p in every_param(space)}
    for name, value in params.items():
        param = by_name.get(name)
        side = param.edge(value) if param is not None else None
        if param is not None and side is not None:
            notes.append(f"the best {name} = {_short(value)} is at the {side} end of its range [{_short(param.low)}, "
                         f"{_short(param.high)}] (in its outer {EDGE:.0%}{', log scale' if param.log else ''}): "
                         "the best value may lie beyond it; widen the range")
    return notes


def write_plots(study: Any, out: Path) -> tuple[dict[str, Path], list[str]]:
    """history.png and importance.png (Optuna's own plots) in `out`, and notes on what was
    skipped."""
    import matplotlib

    matplotlib.use("Agg")  # Optuna's matplotlib plots draw through pyplot: never a window
    import optuna
    from matplotlib import pyplot as plt
    from matplotlib.figure import Figure
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    written: dict[str, Path] = {}
    notes: list[str] = []
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    # Optuna's plots set a pyplot style: rc_context puts the settings back for stagewise's own.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. "importances will be equal": the plot shows it
        figures: dict[str, Callable[[Any], Any]] = {"history": plots.plot_optimization_history} if completed else {}
        if not completed:
            notes.append("no history plot: no trial has completed")
        elif completed >= 2:
            figures["importance"] = plots.plot_param_importances
            if completed < MIN_IMPORTANCE_TRIALS:
                notes.append(f"parameter importances from {completed} completed trials mean little (they need "
                             f"{MIN_IMPORTANCE_TRIALS}): read importance.png as a hint at most")
        else:
            notes.append(f"no parameter importance: it needs 2 completed trials (the study has {completed})")
        for name, draw in figures.items():
            try:
                ax = draw(study)
            except (ValueError, RuntimeError) as e:  # e.g. every trial sampled the same values
                notes.append(f"no {name} plot: {e}")
                continue
            fig = ax.figure
            assert isinstance(fig, Figure)
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            written[name] = out / f"{name}.png"
            fig.savefig(written[name], dpi=100)
            plt.close(fig)
    return written, notes


def load_settings(directory: Path) -> dict[str, Any] | None:
    path = directory / SETTINGS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
