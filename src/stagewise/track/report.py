"""`stagewise report`: one self-contained HTML page of a run, or of several runs compared.

The page embeds its plots as data URIs and has no external CSS or JS, so it can be mailed or
opened offline; the same PNGs are written beside it for slides and issues.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from stagewise.engine.progress import SUMMARY_TEXT_COLUMNS, summary_table
from stagewise.errors import UserError
from stagewise.track.plots import ROUTINE_EVENTS, compare_figure, loss_figure, png, series_figure
from stagewise.track.runs import Run, StageRow, load_run, when
from stagewise.tuning.results import BEST, HEADERS, SETTINGS, load_settings, trial_rows, write_plots

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1040px; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .7em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: .5em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.complete { color: #1a7f37; } .failed { color: #c62828; } .interrupted { color: #b26a00; } .running { color: #0277bd; }
"""


def write_report(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """report.html and its PNGs in `out` (default: the first run's directory); returns the page."""
    if len(run_dirs) == 1 and _is_search(run_dirs[0]):
        return write_search_report(run_dirs[0], out)
    runs = [load_run(path) for path in run_dirs]
    out = out or run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    single = len(runs) == 1
    figures = run_figures(runs[0]) if single else {"compare": compare_figure(runs)}
    images = {}
    for name, fig in figures.items():
        images[name] = png(fig)
        (out / f"{name}.png").write_bytes(images[name])
    if single:
        title, body = _plan_name(runs[0]), _run_body(runs[0], images)
    else:
        title, body = f"{len(runs)} runs compared", _compare_body(runs, images["compare"])
    page = out / "report.html"
    page.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{_e(title)}</title>"
                    f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n", encoding="utf-8")
    return page


def _is_search(directory: Path) -> bool:
    return (directory / SETTINGS).is_file()


def write_search_report(directory: Path, out: Path | None = None) -> Path:
    """A search directory's page: its trials, the best plan, Optuna's history and importance plots."""
    import optuna

    from stagewise.tuning.study import storage_of

    settings = load_settings(directory)
    assert settings is not None
    out = out or directory
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=settings["study"], storage=storage_of(settings["storage"]))
    except KeyError:
        raise UserError(str(directory), f"no study '{settings['study']}' in {settings['storage']}") from None
    rows = trial_rows(study)
    plots, notes = write_plots(study, out)
    states: dict[str, int] = {}
    for row in rows:
        states[row.state] = states.get(row.state, 0) + 1
    facts = [f"objective {settings['metric']} ({settings['direction']})", f"{len(rows)} trials: "
             + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))]
    if settings.get("cv"):
        facts.append(f"{settings['cv']}-fold cross-validation")
    best = directory / BEST
    parts = [f"<h1>search {_e(settings['study'])}</h1>", f"<p>{_e(' · '.join(facts))}</p>"]
    parts += [_img(path.read_bytes(), name) for name, path in plots.items()]
    parts += [f"<p>note: {_e(note)}</p>" for note in notes]
    parts += ["<h2>Trials</h2>", _table(HEADERS, [row.cells() for row in rows], numeric={0, 2})]
    parts += ["<h2>Best plan</h2>", f"<pre>{_e(best.read_text(encoding='utf-8'))}</pre>" if best.is_file()
              else "<p>no trial has completed yet</p>"]
    page = out / "report.html"
    page.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>search {_e(settings['study'])}</title>"
                    f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n",
                    encoding="utf-8")
    return page


def run_figures(run: Run) -> dict[str, Figure]:
    return {"loss": loss_figure(run), "lr": series_figure(run, "lr", "learning rate"),
            "throughput": series_figure(run, "tok_per_s", "tokens/s"),
            "grad_norm": series_figure(run, "grad_norm", "gradient norm")}


def _plan_name(run: Run) -> str:
    """The plan's name (the run directory's only when no plan says it)."""
    name = run.plan.get("name")
    return str(name) if name else run.name


def _run_body(run: Run, images: dict[str, bytes]) -> str:
    title = _plan_name(run) + ("" if _plan_name(run) == run.name else f" ({run.name})")
    parts = [f"<h1>{_e(title)}</h1>", _status(run)]
    parts += [_img(data, name) for name, data in images.items()]
    parts += ["<h2>Stages</h2>", _stage_table(run.stage_rows())]
    summaries = run.summaries()
    if summaries:
        columns, cells = summary_table(summaries)
        parts += ["<h2>Summary</h2>", _table(columns, cells, numeric={i for i, c in enumerate(columns)
                                                                      if c not in SUMMARY_TEXT_COLUMNS})]
    if run.sample is not None:
        parts += [f"<h2>Sample</h2>{_sample_note(run)}", f"<pre>{_e(run.sample)}</pre>"]
    decisions = [e for e in run.events if e.get("event") not in ROUTINE_EVENTS]
    if decisions:
        parts += ["<h2>Decisions</h2>", _table(
            ["step", "event", "stage", "details"],
            [[str(run.event_step(e)), str(e.get("event")), str(e.get("stage", "")), _details(e)]
             for e in decisions])]
    parts += ["<h2>Plan (resolved)</h2>", _plan(run)]
    return "\n".join(parts)


def _compare_body(runs: Sequence[Run], image: bytes) -> str:
    rows = [[r.name, str(r.plan.get("name", "")), r.state, f"{len(r.done_stages)}/{len(r.planned_stages)}",
             _num(r.best_val_loss), str(r.last_step), r.stop_note or ""] for r in runs]
    parts = [f"<h1>{len(runs)} runs compared</h1>",
             _table(["run", "plan", "state", "stages", "best val loss", "last step", "note"], rows, numeric={3, 4, 5}),
             _img(image, "compare")]
    for run in runs:
        parts += [f"<h2>{_e(run.name)}</h2>", _status(run), _stage_table(run.stage_rows()),
                  f"<details><summary>plan</summary>{_plan(run)}</details>"]
    return "\n".join(parts)


def _status(run: Run) -> str:
    start: dict[str, Any] = next((e for e in run.events if e.get("event") == "plan_start"), {})
    facts = [f"<span class='{run.state}'>{run.state}</span>"]
    if run.stop_note:
        facts.append(_e(run.stop_note))
    facts += [f"{k} {_e(str(start[k]))}" for k in ("plan", "device", "precision") if k in start]
    if isinstance(start.get("parameters"), int):
        facts.append(f"{start['parameters']:,} parameters")
    now = time.time()
    if isinstance(start.get("time"), (int, float)):
        facts.append(f"started {_e(when(start['time'], now))}")
    if run.last_time is not None:
        facts.append(f"last update {_e(when(run.last_time, now))}")
    return f"<p>{' · '.join(facts)}</p>"


def _stage_table(rows: list[StageRow]) -> str:
    return _table(
        ["stage", "task", "optimizer", "schedule", "regularization", "steps", "tokens", "time", "best val loss",
         "status"],
        [[r.name, r.task or "-", r.optimizer or "-", r.schedule or "-", r.regularization or "-", _num(r.steps, 0),
          _num(r.tokens, 0), "-" if r.seconds is None else _duration(r.seconds), _num(r.best_val_loss), r.status]
         for r in rows],
        numeric={5, 6, 7, 8})


def _sample_note(run: Run) -> str:
    """Which model wrote the sample, and how (the plan's `sample` settings)."""
    settings = run.plan.get("sample")
    stages = run.planned_stages
    if not isinstance(settings, dict) or not stages:
        return ""
    shown = ", ".join(f"{k} {v!r}" for k, v in settings.items() if v is not None)
    return f"<p>by the last stage, '{_e(stages[-1])}': {_e(shown)}</p>"


def _plan(run: Run) -> str:
    return "<p>no plan.yaml</p>" if run.plan_text is None else f"<pre>{_e(run.plan_text)}</pre>"


def _table(headers: list[str], rows: list[list[str]], numeric: Collection[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _img(data: bytes, name: str) -> str:
    return f"<img alt='{_e(name)}' src='data:image/png;base64,{base64.b64encode(data).decode('ascii')}'>"


def _details(event: dict[str, Any]) -> str:
    """An event's fields, floats to 4 significant digits (a decision's numbers, not their noise)."""
    return " ".join(f"{k}={_short(v)}" for k, v in event.items() if k not in ("event", "time", "stage", "step"))


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if digits == 0 else f"{x:.{digits}f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
