"""Explicit weight penalties added to the loss.

Which parameters are "weights" is decided once, by `is_decayed`, and shared with the optimizers'
decay/no_decay parameter groups so that weight decay and the L1/L2 penalties always act on the
same tensors.
"""

from __future__ import annotations

import torch


def is_decayed(param: torch.Tensor) -> bool:
    """Weight matrices (and higher-rank kernels, embeddings) are regularized; biases and norm gains
    (dim < 2) are not: shrinking them towards 0 only hurts (the nanoGPT rule)."""
    return param.dim() >= 2


def weight_penalty(model: torch.nn.Module, l1: float, l2: float) -> torch.Tensor | None:
    """`l1 * sum|W| + l2 * sum W**2` over the trainable weights, or None when there is nothing to
    add (both strengths 0, or no weights). Tied parameters count once."""
    if l1 < 0 or l2 < 0:
        raise ValueError(f"penalty strengths must be >= 0 (got l1={l1}, l2={l2})")
    if l1 == 0 and l2 == 0:
        return None
    terms: list[torch.Tensor] = []
    for param in model.parameters():  # deduplicates tied parameters
        if not (param.requires_grad and is_decayed(param)):
            continue
        # Sum in float32: a bf16 accumulation over millions of entries loses the penalty's scale.
        if l1:
            terms.append(l1 * param.abs().sum(dtype=torch.float32))
        if l2:
            terms.append(l2 * param.square().sum(dtype=torch.float32))
    return torch.stack(terms).sum() if terms else None
