"""Matplotlib figures of runs and plans, all on the plan's global step axis.

Figures are built with the Agg canvas directly (no pyplot): no global state, no display needed.
Artists a reader (or a test) looks for carry a gid: `stage:<name>` on each stage's band,
`event:<name>` on each marked event, `series:<branch>` on each plotted line (`series:` when the
plan does not branch), `abandoned` on what a rollback went back over.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stagewise.plan.resolved import ResolvedStage
from stagewise.track.branches import Line, lanes, lines
from stagewise.track.plan_view import plan_lr_curve, run_time_lr, wide
from stagewise.track.runs import Run, StageSpan

# Routine events are shown otherwise (stage start/end by the bands, eval by the val curve) or are
# too frequent to mark; every other event is a decision worth a marker, known or not.
ROUTINE_EVENTS = {"plan_start", "plan_end", "stage_start", "stage_end", "stage_saved", "eval", "checkpoint_saved"}
_MARKERS = {  # event -> (marker, colour)
    "optimizer_reset": ("o", "tab:blue"),
    "optimizer_carried": ("s", "tab:green"),
    "optimizer_converted": ("D", "tab:purple"),
    "lr_auto": ("d", "tab:purple"),
    "rule_fired": ("^", "tab:orange"),
    "stage_stopped_early": ("|", "tab:orange"),
    "guard_skip": ("v", "tab:pink"),
    "guard_rollback": ("v", "tab:red"),
    "guard_gave_up": ("X", "tab:red"),
    "stage_reused": ("P", "tab:cyan"),
    "plan_interrupted": ("x", "black"),
    "plan_failed": ("X", "red"),
}
_UNKNOWN = ("*", "tab:gray")


def _figure(rows: int = 1, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(10, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def save_png(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(fig))


def stage_bands(ax: Axes, spans: Sequence[StageSpan]) -> None:
    """Each stage a shaded band over its steps, named at its top. When the plan branches, each
    path through the stage tree has a lane (a horizontal strip), top to bottom in plan order: a
    branch's band lies beside the stages it runs alongside, not over them."""
    palette = colormaps["Pastel1"]
    top = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    lane_of = lanes(spans)
    for i, span in enumerate(spans):
        lane, n = lane_of[span.name]
        low, high = 1 - (lane + 1) / n, 1 - lane / n
        ax.axvspan(span.start, span.end, ymin=low, ymax=high, color=palette(i % palette.N), alpha=0.45, lw=0,
                   zorder=0, gid=f"stage:{span.name}")
        ax.text((span.start + span.end) / 2, high - 0.02, span.name, transform=top, ha="center", va="top",
                fontsize=8, bbox={"fc": "white", "alpha": 0.6, "lw": 0, "pad": 1})


def event_markers(ax: Axes, run: Run) -> None:
    """A dotted line and a marker on the bottom edge at each decision; one legend entry per kind."""
    edge = ax.get_xaxis_transform()
    seen: set[str] = set()
    for event in run.events:
        name = str(event.get("event"))
        if name in ROUTINE_EVENTS:
            continue
        step = run.event_step(event)
        marker, colour = _MARKERS.get(name, _UNKNOWN)
        ax.axvline(step, color=colour, lw=0.8, ls=":", zorder=1)
        ax.plot([step], [0.0], transform=edge, marker=marker, color=colour, ls="none", ms=8, clip_on=False,
                zorder=3, gid=f"event:{name}", label="_nolegend_" if name in seen else name.replace("_", " "))
        if name not in _MARKERS:  # no legend entry would say what it is: name it beside its line
            ax.text(step, 0.05, f" {name}", transform=edge, rotation=90, fontsize=7, color=colour, va="bottom")
        seen.add(name)


def run_lines(run: Run, kind: str, key: str) -> list[Line]:
    """A train (kind "train") or eval field of the run: one line per path through its stage tree."""
    def points(stage: str) -> list[tuple[int, float]]:
        return [(m["step"], float(m[key])) for m in run.metrics if m.get("kind") == kind and m.get("stage") == stage
                and isinstance(m.get(key), (int, float)) and isinstance(m.get("step"), int)]

    return lines(run.spans, points)


def _draw(ax: Axes, line: Line, label: str, **style: Any) -> None:
    ax.plot(line.steps, line.values, label=label, gid=f"series:{line.label or ''}", **style)
    for steps, values in line.abandoned:  # what a rollback went back over: faint, not joined to the rest
        ax.plot(steps, values, color=style.get("color"), lw=0.8, ls=":", alpha=0.6, label="_nolegend_",
                gid="abandoned")


def _path_zorder(i: int) -> float:
    """The first path on top: where branches share their parent's curve, it shows the parent's colour."""
    return 2.5 - i / 100


def loss_figure(run: Run) -> Figure:
    fig, (ax,) = _figure()
    stage_bands(ax, run.spans)
    train, val = run_lines(run, "train", "loss"), run_lines(run, "eval", "val_loss")
    for i, (t, v) in enumerate(zip(train, val, strict=True)):
        if t.label is None:  # one line: the colours say train or validation
            _draw(ax, t, "train loss", color="tab:blue", lw=1.2)
            _draw(ax, v, "val loss", color="tab:red", marker="o", ms=4, lw=1.2)
        else:  # a line per branch: the colour says which, the style train or validation
            _draw(ax, t, f"{t.label}: train loss", color=f"C{i % 10}", lw=1.2, zorder=_path_zorder(i))
            _draw(ax, v, f"{v.label}: val loss", color=f"C{i % 10}", marker="o", ms=4, lw=1.0, ls="--",
                  zorder=_path_zorder(i))
    event_markers(ax, run)
    ax.set(title=f"{run.name}: loss", xlabel="global step", ylabel="loss")
    _legend_outside(ax)
    return fig


def series_figure(run: Run, key: str, ylabel: str) -> Figure:
    """One train-metrics field (lr, tok_per_s, grad_norm) over the plan, with the stage bands."""
    fig, (ax,) = _figure(height=2.8)
    stage_bands(ax, run.spans)
    found = run_lines(run, "train", key)
    _draw_paths(ax, found)
    ax.set(title=f"{run.name}: {ylabel}", xlabel="global step", ylabel=ylabel)
    if key == "lr":
        _log_if_wide(ax, [v for line in found for v in line.values])
    return fig


def _draw_paths(ax: Axes, found: list[Line]) -> None:
    """One field's lines: blue without a legend when the plan does not branch, else a colour and
    a legend entry per path."""
    for i, line in enumerate(found):
        _draw(ax, line, line.label or "_nolegend_", color=f"C{i % 10}" if line.label else "tab:blue", lw=1.2,
              zorder=_path_zorder(i))
    if len(found) > 1:
        _legend_outside(ax)


def compare_figure(runs: Sequence[Run]) -> Figure:
    """Train loss (top) and validation loss (bottom) of several runs overlaid: a colour per run, a
    line style per branch."""
    fig, (train_ax, val_ax) = _figure(rows=2)
    styles = ("-", "--", ":", "-.")
    panels: tuple[tuple[Axes, str, str, dict[str, Any]], ...] = (
        (train_ax, "train", "loss", {}), (val_ax, "eval", "val_loss", {"marker": "o", "ms": 4}))
    for i, run in enumerate(runs):
        for ax, kind, key, extra in panels:
            for j, line in enumerate(run_lines(run, kind, key)):
                label = run.name if line.label is None else f"{run.name}: {line.label}"
                _draw(ax, line, label, color=f"C{i % 10}", lw=1.2, ls=styles[j % len(styles)], **extra)
    train_ax.set(title="train loss", ylabel="loss")
    val_ax.set(title="validation loss", xlabel="global step", ylabel="loss")
    for ax in (train_ax, val_ax):
        _legend_outside(ax)
    return fig


def plan_lr_figure(stages: Sequence[ResolvedStage]) -> Figure:
    """The planned LR of every update, before training; x matches a run's metrics (update k at
    step k), a line per branch."""
    by_name = {s.name: s for s in stages}
    spans = [StageSpan(s.name, s.start_step, s.start_step + s.steps, s.parent) for s in stages]

    def points(name: str) -> list[tuple[int, float]]:
        stage = by_name[name]
        return [(stage.start_step + k + 1, stage.lr(k)) for k in range(stage.steps)]

    fig, (ax,) = _figure(height=3.0)
    stage_bands(ax, spans)
    _draw_paths(ax, lines(spans, points))
    at_run = run_time_lr(stages)
    ax.set(title="planned learning rate" + (f" ({', '.join(at_run)}: known at run time)" if at_run else ""),
           xlabel="global step", ylabel="lr")
    _log_if_wide(ax, plan_lr_curve(list(stages)))
    return fig


def _legend_outside(ax: Axes) -> None:
    """Right of the axes: inside, it would hide the curves or the stage names."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _log_if_wide(ax: Axes, values: Sequence[float]) -> None:
    """Stages' LRs can differ by orders of magnitude (AdamW 1e-3, SGD 0.1): a linear axis would
    flatten the small ones to zero (the terminal chart decides alike)."""
    if wide(values):
        ax.set_yscale("log")
