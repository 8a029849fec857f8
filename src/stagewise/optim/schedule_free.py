"""Schedule-free optimizers (Defazio et al. 2024) through the `schedulefree` package.

They train at one point (y, what the model's parameters hold in train mode) and average another
(x, what they hold in eval mode); the schedule is built in, so a stage gives them a constant LR
(a warmup from the plan's schedule is fine). The engine keeps them in train mode, evaluates with
the averaged weights (`averaged`), and ends the stage in eval mode: the final checkpoint, the
export and the children hold x. Mid-stage checkpoints hold y with the optimizer state beside it,
so a resumed run continues exactly. A child stage takes the averaged weights only (handoff reset):
x is not a point the package's state can carry on from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def build_schedule_free(name: str, groups: list[dict[str, Any]], settings: dict[str, Any]) -> torch.optim.Optimizer:
    import schedulefree  # only plans that use it need the package loaded

    if name == "schedulefree_adamw":
        optimizer: torch.optim.Optimizer = schedulefree.AdamWScheduleFree(
            groups, lr=settings["lr"], betas=tuple(settings["betas"]), eps=settings["eps"])
    else:
        optimizer = schedulefree.SGDScheduleFree(groups, lr=settings["lr"], momentum=settings["momentum"])
    optimizer.train()  # type: ignore[attr-defined]  # the parameters are the training point y from here on
    return optimizer


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return "train_mode" in optimizer.param_groups[0]


@contextmanager
def averaged(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The parameters hold the averaged weights x inside the block; afterwards y exactly as before
    (copied back, not recomputed by train(), whose lerp would not round-trip bit for bit)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    live = [p.detach().clone() for p in params]
    optimizer.eval()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, y in zip(params, live, strict=True):
                p.copy_(y)
        for group in optimizer.param_groups:
            group["train_mode"] = True
