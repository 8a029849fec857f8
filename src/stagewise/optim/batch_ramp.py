"""Batch-size ramps: the sequences of every update of a stage as a pure function of its step (as
optim.schedules is for the LR), so a resumed stage draws exactly the batches it would have, and
`check` shows the ramp before anything runs.

A stage's update is whole micro-batches of `size` sequences (examples): `accumulate` (a0) of them
at its start, B0 = size * a0 sequences. `ramp: {to, over, shape}` grows it to a1 = floor(to / size)
micro-batches (B1 = size * a1: a `to` that is not a multiple of `size` rounds down) over the
first R updates (R = `over`: a step count, or a fraction of the stage's steps), by gradient
accumulation. At step s, k(s) micro-batches:

    linear   k(s) = a0 + floor((a1 - a0) * s / R)          for s < R: the line, in whole micro-batches
    steps    k(s) = a0 + c * floor(n * s / R)              for s < R, c = increment / size, n = (a1 - a0) / c:
                                                            Megatron-LM's --rampup-batch-size (start,
                                                            increment): n equal increments, each
                                                            level held for R / n updates
    both     k(s) = a1                                     for s >= R

(linear is `steps` with an increment of one micro-batch.) The sequences of the first N updates,
sum of size * k(s) over s < N, are computed in closed form (`floor_sum`), so a stage given in
`tokens` or `epochs` finds its step count by bisection without walking the steps.

`lr_scaling` scales the stage's LR with the batch, relative to the start batch: (B(s) / B0) ** p,
p = 1 (`linear`: Goyal et al. 2017's rule for SGD), 1/2 (`sqrt`: for Adam, Malladi et al. 2022, as
OLMo-core's BatchSizeSchedulerCallback does), 0 (`none`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

LR_POWER = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum of floor((a * i + b) / m) for i in [0, n), for n, a, b >= 0 and m >= 1 (ACL's
    floor_sum: Euclid-like, O(log m) steps)."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b = divmod(y_max, m)
        m, a = a, m


@dataclass(frozen=True)
class BatchRamp:
    size: int  # sequences per micro-batch
    start: int  # a0: micro-batches per update at step 0
    end: int  # a1: micro-batches per update from step `steps` on
    steps: int  # R: updates the ramp takes (>= 1)
    levels: int  # n: increments on the way (linear: end - start)
    lr_power: float  # the LR goes with (batch / start batch) ** lr_power

    @property
    def per_level(self) -> int:
        """c: micro-batches each increment adds."""
        return (self.end - self.start) // self.levels

    def micro_batches(self, step: int) -> int:
        """k(step): micro-batches of update `step` (0-based)."""
        if step >= self.steps:
            return self.end
        return self.start + self.per_level * (self.levels * step // self.steps)

    def sequences_before(self, updates: int) -> int:
        """Sequences of the first `updates` updates: sum of size * k(s) for s < updates."""
        ramp = min(updates, self.steps)
        micro = self.start * ramp + self.per_level * floor_sum(ramp, self.steps, self.levels, 0)
        return self.size * (micro + max(0, updates - self.steps) * self.end)

    def lr_factor(self, step: int) -> float:
        """What the stage's LR is multiplied by at `step`."""
        if self.lr_power == 0.0:
            return 1.0
        return (self.micro_batches(step) / self.start) ** self.lr_power


def ramp_steps(over: int | float, total: int) -> int:
    """R: the ramp's updates, `over` as a step count or a fraction of a `total`-step stage."""
    return over if isinstance(over, int) else round(over * total)


def fewest_steps(sequences: int, ramp_for: Callable[[int], BatchRamp]) -> int:
    """The fewest updates N whose ramp (laid over an N-step stage by `ramp_for(N)`) holds at
    least `sequences`, by bisection: over a fixed R the count grows with N; with R a fraction of
    N it grows too but for rounding, and bisection then finds a crossing, which holds enough."""
    low, high = 1, max(1, math.ceil(sequences / ramp_for(1).size))  # one micro-batch per update is enough
    while low < high:
        mid = (low + high) // 2
        if ramp_for(mid).sequences_before(mid) >= sequences:
            high = mid
        else:
            low = mid + 1
    return low
