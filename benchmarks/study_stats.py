"""The study's statistics: per-seed values to mean and std, differences paired by seed, and a
verdict against what the literature expects."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

# two-sided 95% Student t quantiles by degrees of freedom: three seeds give two
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class Comparison:
    """`variant` against `baseline` on `metric`; `expected`: what `reference` found for the
    variant: "better", "worse" or "same"."""

    variant: str
    baseline: str
    expected: str
    reference: str
    metric: str = "val_loss"
    higher_is_better: bool = False


def summary(values: list[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "mean": round(statistics.fmean(values), 4) if values else None,
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else None}


def significant(diffs: list[float]) -> bool | None:
    """Whether the mean difference's 95% t interval excludes 0 (None: fewer than two seeds)."""
    n = len(diffs)
    if n < 2:
        return None
    half = T95.get(n - 1, 2.0) * statistics.stdev(diffs) / math.sqrt(n)
    return abs(statistics.fmean(diffs)) > half


def verdict(c: Comparison, diffs: list[float]) -> str:
    sig = significant(diffs)
    if sig is None:
        return "not run" if not diffs else "one seed: no verdict"
    if c.expected == "same":
        return f"agrees with {c.reference} (within noise)" if not sig else "does not reproduce at this scale"
    if not sig:
        return "within noise"
    better = (statistics.fmean(diffs) > 0) == c.higher_is_better
    return f"agrees with {c.reference}" if better == (c.expected == "better") else "does not reproduce at this scale"


def compare(c: Comparison, variant: dict[int, float], baseline: dict[int, float], shares_prefix: bool) -> dict[str, Any]:
    """A table row: both sides over the seeds that finished both, and their per-seed difference."""
    seeds = sorted(set(variant) & set(baseline))
    diffs = [variant[s] - baseline[s] for s in seeds]
    mine, base, d = (summary([variant[s] for s in seeds]), summary([baseline[s] for s in seeds]), summary(diffs))
    return {"variant": c.variant, "baseline": c.baseline, "metric": c.metric, "higher_is_better": c.higher_is_better,
            "shares_prefix": shares_prefix, "seeds": seeds, "mean": mine["mean"], "std": mine["std"],
            "baseline_mean": base["mean"], "baseline_std": base["std"], "diff_mean": d["mean"], "diff_std": d["std"],
            "diff_per_seed": [round(x, 4) for x in diffs], "expected": c.expected, "reference": c.reference,
            "verdict": verdict(c, diffs)}
