"""Non-finite values never pass silently. Without a guard (which checks every update itself, at
the cost of a host sync per update), each update's loss and gradient norm are checked on the
device: `FiniteWatch.note` keeps the first bad update in a device tensor and costs no sync; the
trainer reads it with the window's mean loss at the logging step (one sync for both) and before
every checkpoint, so no checkpoint is written after a bad update. Weights are checked before a
checkpoint and at the stage's end."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_NONE = 2**62  # no bad update yet


class FiniteWatch:
    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((2,), _NONE, dtype=torch.long, device=device)  # (loss, gradient norm)
        self._true = torch.ones((), dtype=torch.bool, device=device)

    def note(self, update: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Record update number `update` (1-based in the stage); no host sync."""
        finite = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm) if grad_norm is not None else self._true])
        self.first_bad = torch.minimum(self.first_bad, torch.where(finite, _NONE, update))

    def read(self, mean_loss: torch.Tensor) -> tuple[float, str | None]:
        """The window's mean loss as a float, and what was not finite first (None: nothing), in
        one host sync."""
        loss, bad_loss, bad_grad = torch.cat([mean_loss.reshape(1).double(), self.first_bad.double()]).tolist()
        return loss, _describe(int(bad_loss), int(bad_grad))

    def problem(self) -> str | None:
        bad_loss, bad_grad = self.first_bad.tolist()
        return _describe(bad_loss, bad_grad)


def _describe(bad_loss: int, bad_grad: int) -> str | None:
    if min(bad_loss, bad_grad) == _NONE:
        return None
    what = "loss" if bad_loss <= bad_grad else "gradient norm"
    return f"non-finite {what} at update {min(bad_loss, bad_grad)}"


def weights_finite(model: nn.Module) -> bool:
    """Every parameter finite (one host sync); of sharded weights, every rank's shard (agreed)."""
    params = list(model.parameters())
    sharded = any(isinstance(p, DTensor) for p in params)
    checks = [torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in params]
    if not checks:
        return True
    finite = torch.stack(checks).all()
    if sharded:
        finite = finite.int()
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def nonfinite_metrics(metrics: dict[str, float]) -> list[str]:
    """The validation metrics that are NaN or infinite (perplexity apart while the loss is finite:
    exp of a large loss overflows)."""
    loss_finite = math.isfinite(metrics.get("val_loss", 0.0))
    return [k for k, v in metrics.items() if not math.isfinite(v) and not (k == "val_ppl" and loss_finite)]
