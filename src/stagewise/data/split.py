"""The seeded train/validation split of rows that every reader of a table shares: a task stage's
records (tasks.batches) and a causal-LM stage's documents (data.sources). With the same file and
seed both hold out the same rows, so an LM pretrained on a task's text never reads the rows the
task validates on."""

from __future__ import annotations

import torch


def held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) row indices: `fraction` of `n` rows (at least one) drawn by `seed`. `train`
    may be empty; callers say so in their own terms."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * fraction))
    return order[n_val:], order[:n_val]
