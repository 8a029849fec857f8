"""A plan's stage tree laid on its global step axis, for plots.

A branch (`from: stable@100`) starts at its parent's step, beside the stages that follow the
parent: its steps overlap theirs. So a plotted line is one path through the tree, root to leaf,
each stage on it cut at the step the next one forks from (the line never goes back in step), and
the stage bands of each path take a lane of their own (they never overlap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from stagewise.track.runs import StageSpan


@dataclass(frozen=True)
class Line:
    """One path's series: `label` names its stages (`stable@20 → sgd`), None when the plan does
    not branch. `abandoned`: stretches a rollback went back over (trained again after them)."""

    label: str | None
    steps: list[int]
    values: list[float]
    abandoned: list[tuple[list[int], list[float]]] = field(default_factory=list)


def paths(spans: Sequence[StageSpan]) -> list[list[StageSpan]]:
    """Root-to-leaf chains of the stages, one per leaf, in the spans' order (the plan's)."""
    by_name = {s.name: s for s in spans}
    parents = {s.parent for s in spans}
    found = []
    for span in spans:
        if span.name in parents:
            continue
        chain = [span]
        while chain[-1].parent in by_name and by_name[chain[-1].parent] not in chain:
            chain.append(by_name[chain[-1].parent])
        found.append(chain[::-1])
    return found


def lanes(spans: Sequence[StageSpan]) -> dict[str, tuple[int, int]]:
    """Each stage's (lane, lanes): the first path holding it, of all paths."""
    found = paths(spans)
    lane: dict[str, int] = {}
    for i, path in enumerate(found):
        for span in path:
            lane.setdefault(span.name, i)
    return {name: (i, len(found)) for name, i in lane.items()}


def lines(spans: Sequence[StageSpan], points: Callable[[str], list[tuple[int, float]]]) -> list[Line]:
    """Each path's series from `points(stage)`, that stage's (step, value) in the order logged.
    Each stage is cut at the step its successor on the path starts from."""
    found = paths(spans)
    branched = len(found) > 1
    out = []
    for path in found:
        steps: list[int] = []
        values: list[float] = []
        abandoned: list[tuple[list[int], list[float]]] = []
        for span, after in zip(path, [*path[1:], None], strict=True):
            kept, dropped = _final_attempt(points(span.name))
            abandoned += dropped
            for step, value in kept:
                if after is None or step <= after.start:
                    steps.append(step)
                    values.append(value)
        out.append(Line(describe(path) if branched else None, steps, values, abandoned))
    return out


def describe(path: list[StageSpan]) -> str:
    """`stable → cooldown`, `stable@20 → sgd`: where a stage is left before its end, at which of
    its steps."""
    names = [a.name + (f"@{b.start - a.start}" if b.start != a.end else "") for a, b in pairwise(path)]
    return " → ".join([*names, path[-1].name])


def _final_attempt(points: list[tuple[int, float]]) -> tuple[list[tuple[int, float]],
                                                             list[tuple[list[int], list[float]]]]:
    """After a rollback the steps are trained (and logged) again: a point at or before the last
    kept one sets aside the points it goes back over. Returns the points of the trajectory the
    weights took, and the stretches set aside (each from the point it was left at)."""
    kept: list[tuple[int, float]] = []
    dropped = []
    for step, value in points:
        if kept and step <= kept[-1][0]:
            cut = next(i for i, (s, _) in enumerate(kept) if s >= step)
            stretch = kept[max(cut - 1, 0):]
            dropped.append(([s for s, _ in stretch], [v for _, v in stretch]))
            kept = kept[:cut]
        kept.append((step, value))
    return kept, dropped
