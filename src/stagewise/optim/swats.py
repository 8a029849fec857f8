"""Handing training from one optimizer to another: Adam's first moment as SGD's momentum, and the
SWATS estimate of the SGD learning rate that matches Adam's steps (Keskar & Socher, 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def convert_adam_to_sgd(adam: torch.optim.Optimizer, sgd: torch.optim.Optimizer) -> int:
    """Start SGD's momentum buffers from Adam's bias-corrected first moment m_hat. torch's SGD
    buffer is a running sum (buf = mu * buf + g, about g / (1 - mu) in a steady state) where
    Adam's moment is an average (about g), so buf = m_hat / (1 - mu). Returns the parameters
    converted."""
    groups = {p: g for g in adam.param_groups for p in g["params"]}
    converted = 0
    for group in sgd.param_groups:
        mu = group["momentum"]
        for p in group["params"]:
            state = adam.state.get(p)
            if mu == 0.0 or not state or "exp_avg" not in state:
                continue
            beta1 = groups[p]["betas"][0]
            m_hat = state["exp_avg"] / (1.0 - beta1 ** float(state["step"]))
            sgd.state[p]["momentum_buffer"] = (m_hat / (1.0 - mu)).clone()
            converted += 1
    return converted


class SwatsEstimate:
    """gamma_k = p^T p / (-p^T g) for Adam's step p and the gradient g it used, averaged as
    lambda_k = beta2 * lambda_{k-1} + (1 - beta2) * gamma_k; lambda_k / (1 - beta2^k) is the SGD
    learning rate whose steps match Adam's. Call `before` just before `optimizer.step()` and
    `after` just after it (the gradients still in place)."""

    def __init__(self, beta2: float) -> None:
        self.beta2 = beta2
        self.lam = 0.0
        self.k = 0
        self.gamma: float | None = None
        self._before: list[torch.Tensor] = []

    @property
    def corrected(self) -> float | None:
        return self.lam / (1.0 - self.beta2 ** self.k) if self.k else None

    def converged(self, tolerance: float, min_steps: int) -> bool:
        """SWATS's switching test: |lambda_k / (1 - beta2^k) - gamma_k| < tolerance, k > 1."""
        c = self.corrected
        return self.k >= min_steps and c is not None and self.gamma is not None and abs(c - self.gamma) < tolerance

    def before(self, params: Sequence[torch.Tensor]) -> None:
        self._before = [p.detach().clone() for p in params]

    @torch.no_grad()
    def after(self, params: Sequence[torch.Tensor]) -> None:
        pp = torch.zeros((), dtype=torch.float64, device=params[0].device)
        pg = torch.zeros_like(pp)
        for p, old in zip(params, self._before, strict=True):
            if p.grad is None:
                continue
            step = (p - old).double()
            pp += (step * step).sum()
            pg += (step * p.grad.double()).sum()
        self._before = []
        if pg.item() != 0.0:
            self.gamma = (pp / -pg).item()
            self.k += 1
            self.lam = self.beta2 * self.lam + (1.0 - self.beta2) * self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {"beta2": self.beta2, "lam": self.lam, "k": self.k, "gamma": self.gamma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta2, self.lam, self.k, self.gamma = state["beta2"], state["lam"], state["k"], state["gamma"]


def swats_lr(estimate: SwatsEstimate | None, momentum: float, where: str) -> float:
    """The SGD LR for `lr: auto`: SWATS's SGD steps w -= (1 - beta1) * Lambda * v with
    v = beta1 * v + g, which is torch's SGD with momentum mu and lr = (1 - mu) * Lambda."""
    if estimate is None or estimate.corrected is None or estimate.corrected <= 0.0:
        raise ValueError(f"{where}: lr auto needs a SWATS estimate from Adam's steps, and there is none yet")
    return (1.0 - momentum) * estimate.corrected if momentum > 0.0 else estimate.corrected
