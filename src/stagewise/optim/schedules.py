"""Learning-rate schedules: the LR of one stage as a pure function of progress through it.

`lr_at(schedule, step, total, peak)` is the LR of update `step` (0-based) of a `total`-step stage
whose peak LR is `peak`. `step == total` is the LR the stage *ends on*: the next stage starts from
it when it sets no LR of its own. Being pure (no scheduler object, no state) makes resuming from a
checkpoint exact and lets a plan be checked and plotted before anything runs.

Durations (`warmup`, `step_size`, `milestones`, `decay`) are step counts when ints and fractions
of the stage when floats (`resolve_duration`). `min_lr` is an absolute LR, not a fraction of peak.

Warmup (every schedule but onecycle and stlr, which ramp up by themselves), W = warmup steps:

    lr = peak * (step + 1) / (W + 1)        for step < W

It is > 0 at step 0 (a zero LR would waste the first update) and reaches peak at step W; it is
torch's LinearLR(start_factor=1 / (W + 1), total_iters=W). From step W on, the base schedule runs
on t = step - W over T = total - W steps:

    constant     peak
    step         peak * gamma ** floor(step / step_size)
    multistep    peak * gamma ** (number of milestones <= step)
    exponential  peak * gamma ** t
    cosine       min_lr + (peak - min_lr) * (1 + cos(pi * t / T)) / 2
    decay        min_lr + (peak - min_lr) * f(t / T)
    wsd          peak, then over the last D = `decay` steps: min_lr + (peak - min_lr) * f(p),
                 p = (step - (total - D)) / D
    onecycle     torch OneCycleLR(max_lr=peak, total_steps=total, pct_start, div_factor,
                 final_div_factor, anneal_strategy=anneal, three_phase=False) for step < total;
                 its final LR, peak / div_factor / final_div_factor, at step == total
    plateau      peak until evaluations plateau: plan.resolve makes it `constant` plus an on_plateau
                 lr_scale rule (ReduceLROnPlateau), so the curve planned here is constant
    stlr         ULMFiT's slanted triangle (Howard & Ruder 2018, eq. 3), cut = floor(T * cut_frac):
                 p = t / cut if t < cut else max(0, 1 - (t - cut) / (cut * (1 / cut_frac - 1))),
                 lr = peak * (1 + p * (ratio - 1)) / ratio

with the decay shape f: linear 1 - p, cosine (1 + cos(pi p)) / 2, 1-sqrt 1 - sqrt(p).

`step` and `multistep` count from the stage start (as torch's StepLR/MultiStepLR do, and as
DeepSeek's `milestones: [0.8, 0.9]` are meant), so their steps must come after the warmup.
cosine, decay and wsd reach min_lr exactly at step == total. stlr's clamp at p = 0 only matters
when T * cut_frac is not whole: the paper's decay length cut * (1/cut_frac - 1) is then shorter
than T - cut and p would go negative (for short stages, the LR too); the clamp holds the paper's
stated minimum, peak / ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from stagewise.config.optimizer_config import ScheduleConfig
from stagewise.config.registry import SCHEDULES

# Decay shapes: 1 at p = 0 (start of the decay), 0 at p = 1 (end).
_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: (1.0 + math.cos(math.pi * p)) / 2.0,
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


def resolve_duration(d: int | float, total: int) -> int:
    """Steps of a duration: an int as given, a float in [0, 1] as that fraction of the stage."""
    if isinstance(d, bool) or not isinstance(d, int | float):
        raise ValueError(f"a duration is an int (steps) or a float in [0, 1] (got {d!r})")
    if d < 0:
        raise ValueError(f"a duration must be >= 0 (got {d})")
    if isinstance(d, int):
        return d
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"a fractional duration must be in [0, 1] (got {d})")
    return round(d * total)


def _check_total(total: int) -> None:
    if total < 1:
        raise ValueError(f"a stage has at least 1 step (got total={total})")


def _warmup(settings: dict, total: int) -> int:
    return resolve_duration(settings.get("warmup", 0), total)


def _inside_stage(value: int, warmup: int, total: int) -> str | None:
    """Why a step/multistep boundary (counted from the stage start) is misplaced, if it is."""
    if value > total:
        return f"must be <= steps (got {value} > {total})"
    if value <= warmup:
        # A boundary inside the warmup would cut the LR before it has reached peak.
        return f"must be > warmup (got {value} <= {warmup})" if warmup else f"must be >= 1 step (got {value})"
    return None


def schedule_problems(schedule: ScheduleConfig, total: int) -> list[tuple[str, str]]:
    """(setting, message) for each setting impossible in a stage of `total` steps."""
    _check_total(total)
    s = schedule.settings()
    problems: list[tuple[str, str]] = []
    warmup = _warmup(s, total)
    if warmup >= total:
        problems.append(("warmup", f"must be < steps (got {warmup} >= {total})"))

    name = schedule.name
    plugin = SCHEDULES[name].problems
    if plugin is not None:  # a plug-in's (config.registry)
        problems += plugin(s, total)
    if name == "step":
        why = _inside_stage(resolve_duration(s["step_size"], total), warmup, total)
        if why:
            problems.append(("step_size", why))
    elif name == "multistep":
        for milestone in s["milestones"]:
            why = _inside_stage(resolve_duration(milestone, total), warmup, total)
            if why:
                problems.append(("milestones", why))
    elif name == "wsd":
        decay = resolve_duration(s["decay"], total)
        if decay < 1:
            problems.append(("decay", f"must be >= 1 step (got {decay}); a wsd without decay is 'constant'"))
        elif warmup + decay > total:
            problems.append(("decay", f"warmup + decay must be <= steps (got {warmup} + {decay} > {total})"))
    elif name == "onecycle":
        # OneCycleLR's warm-up phase ends at step pct_start * total - 1; at or before step 0 it is
        # empty (torch divides by zero, or starts mid-anneal).
        if s["pct_start"] * total <= 1:
            problems.append(("pct_start", f"too few steps: pct_start * steps must be > 1 "
                                          f"(got {s['pct_start']} * {total})"))
    elif name == "stlr":
        if math.floor(total * s["cut_frac"]) < 1:
            problems.append(("cut_frac", f"too few steps: cut_frac * steps must be >= 1 "
                                         f"(got {s['cut_frac']} * {total})"))
    return problems


def lr_at(schedule: ScheduleConfig, step: int, total: int, peak: float) -> float:
    """The LR of update `step` of a `total`-step stage; `step == total` is the value it ends on."""
    _check_total(total)
    if not 0 <= step <= total:
        raise ValueError(f"step must be in [0, {total}] (got {step})")
    problems = schedule_problems(schedule, total)
    if problems:
        raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))

    s = schedule.settings()
    name = schedule.name
    plugin = SCHEDULES[name].lr
    if plugin is not None:  # a plug-in's (config.registry): the whole stage is its own, warmup too
        return plugin(s, step, total, peak)
    if name == "onecycle":
        return _onecycle(s, step, total, peak)
    if name == "stlr":
        return _stlr(s, step, total, peak)

    warmup = _warmup(s, total)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    t, span = step - warmup, total - warmup
    if name in ("constant", "plateau"):
        return peak
    if name == "step":
        return peak * s["gamma"] ** (step // resolve_duration(s["step_size"], total))
    if name == "multistep":
        passed = sum(resolve_duration(m, total) <= step for m in s["milestones"])
        return peak * s["gamma"] ** passed
    if name == "exponential":
        return peak * s["gamma"] ** t
    if name == "cosine":
        return s["min_lr"] + (peak - s["min_lr"]) * (1 + math.cos(math.pi * t / span)) / 2
    if name == "decay":
        return s["min_lr"] + (peak - s["min_lr"]) * _SHAPES[s["shape"]](t / span)
    assert name == "wsd", f"unhandled schedule {name}"
    decay = resolve_duration(s["decay"], total)
    start = total - decay
    if step < start:
        return peak
    return s["min_lr"] + (peak - s["min_lr"]) * _SHAPES[s["shape"]]((step - start) / decay)


def _onecycle(s: dict, step: int, total: int, peak: float) -> float:
    # Written as torch's OneCycleLR computes it, operation for operation, so values match exactly.
    initial = peak / s["div_factor"]
    final = initial / s["final_div_factor"]
    if step == total:
        return final
    rise_end = float(s["pct_start"] * total) - 1
    if step <= rise_end:
        start, end, pct = initial, peak, step / rise_end
    else:
        start, end, pct = peak, final, (step - rise_end) / (total - 1 - rise_end)
    if s["anneal"] == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _stlr(s: dict, step: int, total: int, peak: float) -> float:
    cut_frac, ratio = s["cut_frac"], s["ratio"]
    cut = math.floor(total * cut_frac)
    if step < cut:
        p = step / cut
    else:
        p = max(0.0, 1 - (step - cut) / (cut * (1 / cut_frac - 1)))
    return peak * (1 + p * (ratio - 1)) / ratio
