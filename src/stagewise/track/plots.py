"""Matplotlib figures of runs and plans, all on the plan's global step axis.

Figures are built with the Agg canvas directly (no pyplot): no global state, no display needed.
Artists a reader (or a test) looks for carry a gid: `stage:<name>` on each stage's band,
`event:<name>` on each marked event.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stagewise.plan.resolve import ResolvedStage
from stagewise.track.plan_view import plan_lr_curve
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
    """Each stage a shaded band over its steps, named at the top."""
    palette = colormaps["Pastel1"]
    top = ax.get_xaxis_transform()  # x in steps, y in axes fractions
    for i, span in enumerate(spans):
        ax.axvspan(span.start, span.end, color=palette(i % palette.N), alpha=0.45, lw=0, zorder=0,
                   gid=f"stage:{span.name}")
        ax.text((span.start + span.end) / 2, 0.98, span.name, transform=top, ha="center", va="top",
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


def _series(run: Run, kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [m for m in run.metrics if m.get("kind") == kind and isinstance(m.get(key), (int, float))]
    return [m["step"] for m in rows], [float(m[key]) for m in rows]


def loss_figure(run: Run) -> Figure:
    fig, (ax,) = _figure()
    stage_bands(ax, run.spans)
    ax.plot(*_series(run, "train", "loss"), color="tab:blue", lw=1.2, label="train loss")
    ax.plot(*_series(run, "eval", "val_loss"), color="tab:red", marker="o", ms=4, lw=1.2, label="val loss")
    event_markers(ax, run)
    ax.set(title=f"{run.name}: loss", xlabel="global step", ylabel="loss")
    _legend_outside(ax)
    return fig


def series_figure(run: Run, key: str, ylabel: str) -> Figure:
    """One train-metrics field (lr, tok_per_s, grad_norm) over the plan, with the stage bands."""
    fig, (ax,) = _figure(height=2.8)
    stage_bands(ax, run.spans)
    steps, values = _series(run, "train", key)
    ax.plot(steps, values, color="tab:blue", lw=1.2)
    ax.set(title=f"{run.name}: {ylabel}", xlabel="global step", ylabel=ylabel)
    if key == "lr":
        _log_if_wide(ax, values)
    return fig


def compare_figure(runs: Sequence[Run]) -> Figure:
    """Train loss (top) and validation loss (bottom) of several runs overlaid, a line per run each."""
    fig, (train_ax, val_ax) = _figure(rows=2)
    for i, run in enumerate(runs):
        train_ax.plot(*_series(run, "train", "loss"), color=f"C{i % 10}", lw=1.2, label=run.name)
        val_ax.plot(*_series(run, "eval", "val_loss"), color=f"C{i % 10}", marker="o", ms=4, lw=1.2, label=run.name)
    train_ax.set(title="train loss", ylabel="loss")
    val_ax.set(title="validation loss", xlabel="global step", ylabel="loss")
    for ax in (train_ax, val_ax):
        _legend_outside(ax)
    return fig


def plan_lr_figure(stages: Sequence[ResolvedStage]) -> Figure:
    """The planned LR of every update, before training; x matches a run's metrics (update k at step k)."""
    curve = plan_lr_curve(list(stages))
    fig, (ax,) = _figure(height=3.0)
    stage_bands(ax, [StageSpan(s.name, s.start_step, s.start_step + s.steps) for s in stages])
    ax.plot(range(1, len(curve) + 1), curve, color="tab:blue", lw=1.2)
    ax.set(title="planned learning rate", xlabel="global step", ylabel="lr")
    _log_if_wide(ax, curve)
    return fig


def _legend_outside(ax: Axes) -> None:
    """Right of the axes: inside, it would hide the curves or the stage names."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _log_if_wide(ax: Axes, values: Sequence[float]) -> None:
    """Stages' LRs can differ by orders of magnitude (AdamW 1e-3, SGD 0.1): a linear axis would
    flatten the small ones to zero."""
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")
