"""Sampling from a causal LM, cropped to its context (nanoGPT's generate, plus top-p), and where a
continuation ends: at an end token (EOS, a chat template's end-of-turn token) or a stop string."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Stop:
    """Where generated text ends. `token_ids`: tokens that end it (not part of the text);
    `strings`: texts that end it once the decoded continuation contains one (cut before it, as
    OpenAI's `stop` does); `decode`: ids -> text, needed for `strings`."""

    token_ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        assert self.decode is not None or not self.strings, "stop strings need a decode function"

    def reached(self, generated: Sequence[int]) -> bool:
        """Whether a continuation (its generated ids so far) has ended."""
        if any(i in self.token_ids for i in generated):
            return True
        if not self.strings or not generated:
            return False
        assert self.decode is not None
        text = self.decode(list(generated))
        return any(s in text for s in self.strings)

    def cut(self, generated: Sequence[int]) -> tuple[list[int], str | None]:
        """The ids before the first end token and, with stop strings, the decoded text cut before
        the first of them (None without stop strings: decode the ids as usual)."""
        ids = list(generated)
        for n, i in enumerate(ids):
            if i in self.token_ids:
                ids = ids[:n]
                break
        if not self.strings:
            return ids, None
        assert self.decode is not None
        text = self.decode(ids)
        ends = [at for s in self.strings if (at := text.find(s)) >= 0]
        return ids, text[: min(ends)] if ends else text


@torch.no_grad()
def sample(model: torch.nn.Module, ids: torch.Tensor, max_tokens: int, context: int,
           temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, stop: Stop | None = None) -> torch.Tensor:
    """Extend `ids` (B, T) by up to `max_tokens` tokens; temperature 0 is greedy. With `stop`,
    sampling ends once every row's continuation has reached it (the ids then still hold the
    token or text that ended each row: `Stop.cut` removes it)."""
    was_training = model.training
    model.eval()
    start = ids.size(1)
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
        if stop is not None and all(stop.reached(row) for row in ids[:, start:].tolist()):
            break
    model.train(was_training)
    return ids


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    mass = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = mass - F.softmax(sorted_logits, dim=-1) >= p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
