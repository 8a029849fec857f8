"""The seeded train/validation split of rows that every reader of a table shares: a task stage's
records (tasks.batches) and a causal-LM stage's documents (data.sources). With the same file and
seed both hold out the same rows, so an LM pretrained on a task's text never reads the rows the
task validates on. Cross-validation (stagewise search --cv) splits rows into stratified folds."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) row indices: `fraction` of `n` rows (at least one) drawn by `seed`. `train`
    may be empty; callers say so in their own terms."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * fraction))
    return order[n_val:], order[:n_val]


def stratified_folds(labels: Sequence[str], k: int, seed: int) -> list[list[int]]:
    """`k` disjoint validation folds covering every row, each holding about 1/k of every label
    (scikit-learn's StratifiedKFold, shuffled by `seed`): the rows of each label, in a seeded
    order, are dealt to the folds in turn, the turn going on from one label to the next so the
    folds' sizes differ by at most one."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    by_label: dict[str, list[int]] = {}
    for row in order:
        by_label.setdefault(labels[row], []).append(row)
    folds: list[list[int]] = [[] for _ in range(k)]
    turn = 0
    for label in sorted(by_label):
        for row in by_label[label]:
            folds[turn % k].append(row)
            turn += 1
    return [sorted(fold) for fold in folds]
