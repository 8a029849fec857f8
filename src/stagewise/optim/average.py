"""Weight averaging. During a stage: an exponential moving average of the parameters (Polyak
averaging, as timm's ModelEma and torch.optim.swa_utils.get_ema_multi_avg_fn do), kept on the
device beside them. After every applied update

    ema <- ema + (1 - decay) * (p - ema)        (torch.lerp)

starting from the stage's first weights. The stage evaluates with the average swapped in, and
ends on it: its final checkpoint, its export and its children hold the averaged weights; its
mid-stage checkpoints hold the live weights with the average beside them (a branch `from:
NAME@STEP` starts from the live weights).

Between stages: a merge stage's weights are a weighted mean of its parent's checkpoints
(`merge_states`; WSM's checkpoint merging, a model soup of one run)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = list(model.parameters())  # tied weights once
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block, its live weights again after it."""
        live = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], live)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_([p.data for p in self.params], self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [t.detach().cpu().clone() for t in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self.shadow, [t.to(s.device) for t, s in zip(state["shadow"], self.shadow, strict=True)])


def merge_coefficients(k: int, weights: str) -> list[float]:
    """The weight of each of k checkpoints, oldest first, summing to 1: uniform 1/k; linear i/sum(1..k)."""
    raw = [1.0] * k if weights == "uniform" else [float(i) for i in range(1, k + 1)]
    return [w / sum(raw) for w in raw]


@torch.no_grad()
def merge_states(states: Iterable[dict[str, torch.Tensor]], coefficients: list[float]) -> dict[str, torch.Tensor]:
    """sum_i c_i * state_i, elementwise, of model state dicts (checkpoint merging: a merge stage),
    summed in float64 and returned in each tensor's dtype; tensors that are not floating point
    (counters, masks) are the last state's. `states` is read one at a time: one model in memory."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for state, c in zip(states, coefficients, strict=True):
        for name, t in state.items():
            dtypes[name] = t.dtype
            if not t.is_floating_point():
                total[name] = t.detach().clone()
            elif name in total:
                total[name].add_(t.detach().double(), alpha=c)
            else:
                total[name] = t.detach().double() * c
    return {name: t.to(dtypes[name]) for name, t in total.items()}
