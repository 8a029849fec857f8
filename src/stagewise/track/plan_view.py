"""`stagewise check`: the resolved stage tree and the LR curve of the whole plan, as text."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from stagewise.plan.resolved import ResolvedStage


def plan_lr_curve(stages: list[ResolvedStage]) -> list[float]:
    """The LR of every global step of the plan (the base LR, before per-group scales)."""
    return [s.lr(step) for s in stages for step in range(s.steps)]


def wide(values: Sequence[float]) -> bool:
    """Whether the positive values span more than 30x: a log axis then (AdamW at 1e-3 beside SGD
    at 0.3 would be a flat zero on a linear one). Zeros (a decay's end) do not count."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 30


def print_plan(console: Console, name: str, stages: list[ResolvedStage], status: dict[str, str],
               width: int = 72, height: int = 8) -> None:
    """`status`: per stage, what training will do with it (reuse / resume at step N / train)."""
    table = Table(title=f"plan {name}")
    for col in ("stage", "parent", "task", "optimizer", "schedule", "duration", "batch", "regularization / layers",
                "rules", "status"):
        table.add_column(col)
    for s in stages:
        cfg = s.config
        parent = "-" if s.parent is None else s.parent + (f"@{s.parent_step}" if s.parent_step is not None else "")
        table.add_row(s.name, parent, cfg.task + _mix(s), _optimizer(s), _schedule(s), _duration(s), _batch(s),
                      _regularization(s), _rules(s), status[s.name])
    console.print(table)
    curve = plan_lr_curve(stages)
    scale = ", log scale" if wide(curve) else ""
    console.print(f"LR over the plan ({sum(s.steps for s in stages)} steps, peak {max(curve):.2e}{scale}):")
    for line in lr_chart(stages, width, height):
        console.print(line, highlight=False)
    at_run = run_time_lr(stages)
    if at_run:
        console.print(f"known only at run time, drawn at the LR planned before them: {', '.join(at_run)}")


def run_time_lr(stages: Sequence[ResolvedStage]) -> list[str]:
    """The stages whose LR the plan cannot know (lr auto, or continuing one that is)."""
    return [s.name for s in stages if s.auto_lr or s.lr_at_run]


def lr_chart(stages: list[ResolvedStage], width: int, height: int) -> list[str]:
    """A block chart: each column the mean LR of its slice of steps; `|` marks stage starts. On a
    log scale when the LRs span more than 30x (as the PNG of `check --plot`), from the smallest
    column (at most 4 decades below the peak) up to the peak."""
    curve = plan_lr_curve(stages)
    top = max(curve) or 1.0
    n = len(curve)
    cols = min(width, n)
    means = []
    for c in range(cols):
        chunk = curve[c * n // cols:(c + 1) * n // cols]
        means.append(sum(chunk) / len(chunk))
    offsets = [sum(s.steps for s in stages[:i]) for i in range(len(stages))]  # the curve's order, not the plan's axis
    starts = {o * cols // n for o in offsets[1:]}
    if wide(curve):
        low = max(min(m for m in means if m > 0), top * 1e-4)
        span = math.log(top / low) if top > low else 1.0
        # the smallest column fills the bottom row, the peak the top one
        heights = [1 + (height - 1) * math.log(m / low) / span if m >= low else 0.0 for m in means]
        labels = [low * (top / low) ** ((r - 1) / max(height - 1, 1)) for r in range(height, 0, -1)]
    else:
        heights = [m / top * height for m in means]
        labels = [top * r / height for r in range(height, 0, -1)]
    rows = []
    for r, label in zip(range(height, 0, -1), labels, strict=True):
        line = "".join("█" if h >= r - 0.5 else ("|" if c in starts else " ") for c, h in enumerate(heights))
        rows.append(f"{label:9.2e} {line}")
    labels = [" "] * cols
    for s, offset in zip(stages, offsets, strict=True):
        c = offset * cols // n
        for i, ch in enumerate(s.name[: max(1, (s.steps * cols // n) - 1)]):
            if c + i < cols:
                labels[c + i] = ch
    rows.append(" " * 10 + "".join(labels))
    return rows


def _mix(s: ResolvedStage) -> str:
    """A stage's data mixture, a source a line with its share of the sequences."""
    mix = s.config.data.mix if s.config.data is not None else None
    if mix is None:
        return ""
    total = sum(m.weight for m in mix)
    return "".join(f"\n{m.label(i)} {m.weight / total:.0%}" for i, m in enumerate(mix))


def _optimizer(s: ResolvedStage) -> str:
    if s.merged:
        return "- (a merge)"
    keep = {k: v for k, v in s.optimizer_settings.items() if k != "lr"}
    extra = " ".join(f"{k}={v}" for k, v in keep.items())
    lr = "auto (SWATS)" if s.auto_lr else f"{s.parent}'s (run time)" if s.lr_at_run else f"{s.peak_lr:.2e}"
    handoff = f" {s.handoff}" if s.handoff != "reset" else ""
    return f"{s.optimizer} lr={lr}{handoff}" + (f"\n{extra}" if extra else "")


def _rules(s: ResolvedStage) -> str:
    """until, rules (condition -> action) and guard, one per line."""
    cfg = s.config
    lines = []
    if cfg.until is not None:
        lines.append("until " + " | ".join(k for k in ("plateau", "target", "time") if getattr(cfg.until, k)))
    lines += [f"{r.when.kind} -> {r.do.kind}" for r in cfg.all_rules()]
    if cfg.guard is not None:
        lines.append(f"guard {'spike+' if cfg.guard.spike else ''}nan -> {cfg.guard.action}")
    lines += [f"inject {f.kind}@{f.at}" for f in cfg.inject]
    if cfg.end == "best":
        lines.append("end on best eval")
    return "\n".join(lines) or "-"


def _schedule(s: ResolvedStage) -> str:
    if s.merged:
        return "-"
    sched = s.node.config.schedule  # as planned: a plateau schedule runs as constant + its on_plateau rule
    settings = " ".join(f"{k}={v}" for k, v in sched.settings().items() if v not in (0, None) or k == "min_lr")
    return f"{sched.name} {settings}".strip()


def _duration(s: ResolvedStage) -> str:
    cfg = s.config
    if cfg.merge is not None:
        return f"0 steps: {cfg.merge.weights} mean of {s.parent} at {', '.join(map(str, s.merged))}"
    if cfg.epochs is not None:
        return f"{cfg.epochs} epochs = {s.steps} steps"
    if cfg.tokens is not None:
        return f"{cfg.tokens:,} tokens = {s.steps} steps"
    return f"{s.steps} steps"


def _batch(s: ResolvedStage) -> str:
    if s.ramp is not None:
        return _ramp(s)
    if s.unit != "tokens":
        accum = f" x{s.micro_batches}" if s.micro_batches > 1 else ""
        return f"full ({s.windows_per_epoch} ex)" if s.full_batch else f"{s.batch_size}{accum} ex"
    if s.full_batch:
        return f"full ({s.windows_per_epoch} x {s.block_size})"
    accum = f" x{s.micro_batches}" if s.micro_batches > 1 else ""
    return f"{s.batch_size}{accum} x {s.block_size} = {s.tokens_per_step:,} tok"


def _ramp(s: ResolvedStage) -> str:
    """A growing batch: from and to (micro-batch x count), over how many steps, in what shape."""
    ramp, cfg = s.ramp, s.config.batch.ramp
    assert ramp is not None and cfg is not None
    unit = f" x {s.block_size}" if s.unit == "tokens" else " ex"
    shape = "linear" if cfg.shape == "linear" else f"+{cfg.increment} x{ramp.levels}"
    lines = [f"{s.batch_size} x{ramp.start} -> x{ramp.end}{unit}", f"ramp {shape} over {ramp.steps} steps"]
    if cfg.lr_scaling != "none":
        lines.append(f"lr x (batch/{s.batch_size * ramp.start}){'^0.5' if cfg.lr_scaling == 'sqrt' else ''}")
    return "\n".join(lines + [f"{s.tokens_before(s.steps):,} {'tok' if s.unit == 'tokens' else 'ex'} in all"])


def _regularization(s: ResolvedStage) -> str:
    reg = s.config.regularization
    parts = [f"{k}={getattr(reg, k)}" for k in ("l1", "l2", "dropout", "grad_clip")
             if getattr(reg, k) not in (None, 0.0)]
    layers = s.config.layers
    lines = [" ".join(parts)] if parts else []
    if layers.freeze:
        lines.append("freeze " + ", ".join(layers.freeze))
    if layers.unfreeze == "gradual":
        lines.append("unfreeze gradual (+1 group/epoch)")
    if layers.lr_factor != 1.0:
        lines.append(f"lr /{layers.lr_factor:g} per group down")
    if s.config.average is not None:
        lines.append(f"ema {s.config.average.ema:g} (evaluated, handed on)")
    return "\n".join(lines) or "-"
