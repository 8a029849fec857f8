"""Sampling from a causal LM, cropped to its context (nanoGPT's generate, plus top-p)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


@torch.no_grad()
def sample(model: torch.nn.Module, ids: torch.Tensor, max_tokens: int, context: int,
           temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend `ids` (B, T) by `max_tokens` tokens; temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    past = None  # the KV cache, while the sequence fits the context: then each step feeds one token
    for _ in range(max_tokens):
        if ids.size(1) <= context:
            fed = ids if past is None else ids[:, -1:]
            out = model(input_ids=fed, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:  # beyond the context: the window slides, so every step recomputes it (nanoGPT's crop)
            out = model(input_ids=ids[:, -context:], use_cache=False)
        logits = out.logits[:, -1, :].float()  # (B, V)
        if temperature == 0.0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p is not None:
                logits = _top_p(logits, top_p)
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return ids


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    mass = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = mass - F.softmax(sorted_logits, dim=-1) >= p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
