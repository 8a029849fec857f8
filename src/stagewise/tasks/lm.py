"""The `causal_lm` task: next-token prediction over windows of a token stream (data.sampler),
counted in tokens; validation is the token-weighted mean loss over the first validation windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn import functional as F

from stagewise.data.prepare import PreparedData
from stagewise.data.sampler import WindowSampler
from stagewise.tasks.base import Batch, BatchSource, Task


class LanguageModelLoss(nn.Module):
    """Model and loss as one module, so `torch.compile` sees (and fuses) the cross-entropy too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # No KV cache: nothing reads it here, and a compiled forward would return it as extra outputs.
        self.no_cache = {"use_cache": False} if getattr(model.config, "use_cache", False) else {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch; x, y: (B, T)."""
        logits = self.model(input_ids=x, **self.no_cache).logits  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


class LanguageModelTask(Task):
    kind = "causal_lm"
    unit = "tokens"

    def __init__(self, model: nn.Module, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[None]], data: PreparedData, compile: bool) -> None:
        super().__init__(model, device, autocast)
        self.data = data
        module = LanguageModelLoss(model)
        self.loss_module: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.compile(module) if compile else module)

    def sampler(self, block_size: int, batch_size: int, seed: int) -> BatchSource:
        return WindowSampler(self.data.train, block_size, batch_size, seed=seed)

    def loss(self, batch: Batch) -> torch.Tensor:
        x, y = batch
        with self.autocast():
            return self.loss_module(x, y)

    @torch.no_grad()
    def evaluate(self, block_size: int, batch_size: int, limit: int | None) -> dict[str, float]:
        """Token-weighted mean loss over the same validation windows every time."""
        val = WindowSampler(self.data.val, block_size, batch_size, seed=0, shuffle=False)
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for x, y in val.iter_eval(limit):
            x, y = x.to(self.device), y.to(self.device)
            total += self.loss((x, y)) * y.numel()
            count += y.numel()
        self.model.train()
        loss = (total / count).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def corrupt(self, batch: Batch, step: int) -> Batch:
        """A batch of random tokens (the same for the same step), as a data pipeline bug would give."""
        x = batch[0]
        g = torch.Generator().manual_seed(step)
        bad = torch.randint(0, self.data.vocab_size, (x.size(0), x.size(1) + 1), generator=g).to(x.device)
        return bad[:, :-1].contiguous(), bad[:, 1:].contiguous()
