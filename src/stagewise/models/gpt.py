"""stagewise's own GPT (`model.arch: gpt`), nanoGPT's model: pre-LayerNorm blocks of causal
self-attention and a GELU MLP, learned positions, the token embedding tied to the output head,
N(0, 0.02) weights with the residual projections scaled by 1/sqrt(2 n_layer). `bias: false`
drops the Linear and LayerNorm biases as nanoGPT does by default; `bias: true` is GPT-2's
layout (with exact GELU, not GPT-2's tanh approximation).

Why a second GPT next to transformers' gpt2: it builds without importing transformers (its
modelling code takes ~3 s to import, the whole start-up budget of a small run), and it is exactly
the model nanoGPT's results are quoted for.

It answers the causal-LM calls the rest of stagewise makes of a transformers model, under the
same names: `model(input_ids=..., past_key_values=..., use_cache=...)` returns `.logits` and
`.past_key_values`; `config` has `max_position_embeddings`, `hidden_size`, `num_hidden_layers`,
`model_type` and `_attn_implementation` ("sdpa", or "eager": plain matmul and softmax, which
inductor fuses on CPU), and `set_attn_implementation` switches it; `activation_checkpointing_enable`
recomputes each block in the backward pass (torch.utils.checkpoint), as transformers' models do.

Packed rows (several examples laid end to end, tasks.sft) pass `position_ids` that restart at 0
with each example: positions are embedded from them, and attention is block-diagonal, so no
example attends to the one before it in the row (transformers' packed position_ids path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from stagewise.config.plan_config import ArchSettings
from stagewise.config.registry import register_arch

KV = tuple[torch.Tensor, torch.Tensor]  # one block's keys and values, each (B, nh, T, hs)
ATTENTION = ("sdpa", "eager")


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    bias: bool
    dropout: float
    _attn_implementation: str = "sdpa"
    model_type: str = "gpt"
    use_cache: bool = True  # the model can keep a KV cache (generation asks for it)

    def settings(self) -> dict[str, Any]:
        """The constructor's settings (all but the vocabulary, which the data sets): an export's model.json."""
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd, "n_positions": self.n_positions,
                "bias": self.bias, "dropout": self.dropout}

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V)
    past_key_values: list[KV] | None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # True where a query may look: itself and earlier positions
        mask = torch.tril(torch.ones(config.n_positions, config.n_positions, dtype=torch.bool))
        self.causal: torch.Tensor
        self.register_buffer("causal", mask, persistent=False)

    def forward(self, x: torch.Tensor, past: KV | None, documents: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """`documents` (B, 1, T, T), True where a query may look: packed rows' block-diagonal
        causal mask (GPT.forward); None: plain causal attention."""
        B, T, C = x.shape
        nh = self.config.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:  # generation: the new positions attend to the cached ones too
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        S = k.size(2)
        visible = self.causal[S - T:S, :S] if documents is None else documents  # the new queries sit at the end
        p = self.attn_dropout.p if self.training else 0.0
        if self.config._attn_implementation == "sdpa":
            plain = past is None and documents is None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if plain else visible,
                                               dropout_p=p, is_causal=plain)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            att = self.attn_dropout(att.masked_fill(~visible, float("-inf")).softmax(dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: KV | None, documents: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn(self.ln_1(x), past, documents)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPTSettings(ArchSettings):
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads (they split n_embd)."""
    n_embd: int = 768
    """Width of the residual stream."""
    n_positions: int = 1024
    """The longest sequence (learned position embeddings)."""
    bias: bool = True
    """Biases in the linear layers and layer norms."""
    dropout: float = 0.0
    """The model's own dropout rate (a stage's `dropout` replaces it)."""


@register_arch("gpt", GPTSettings)
class GPT(nn.Module):
    def __init__(self, *, vocab_size: int, n_layer: int = 12, n_head: int = 12, n_embd: int = 768,
                 n_positions: int = 1024, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
        self.config = GPTConfig(vocab_size, n_layer, n_head, n_embd, n_positions, bias, dropout)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(self.config) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (weight tying: Press & Wolf 2017)
        self.checkpointing: dict[str, Any] | None = None  # torch.utils.checkpoint's options, while on
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: GPT-2's 1/sqrt(2 n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def parameter_count(*, vocab_size: int, n_layer: int = 12, n_embd: int = 768, n_positions: int = 1024,
                        bias: bool = True, **_: object) -> int:
        """What the constructor would build, without building it (plan.model_keys checks a plan's size
        before any data is read; a model on the meta device would still import torch's compiler)."""
        C = n_embd
        block = 12 * C * C + (9 * C if bias else 0) + 2 * C * (2 if bias else 1)  # 4 Linear, 2 LayerNorm
        return (vocab_size + n_positions) * C + n_layer * block + C * (2 if bias else 1)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_attn_implementation(self, name: str) -> None:
        if name not in ATTENTION:
            raise ValueError(f"gpt attention is one of {', '.join(ATTENTION)} (got '{name}')")
        self.config._attn_implementation = name

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Keep only each block's input in training; its activations are recomputed in the backward
        pass (torch.utils.checkpoint with `activation_checkpointing_kwargs`, transformers' signature)."""
        self.checkpointing = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def forward(self, input_ids: torch.Tensor, past_key_values: list[KV] | None = None,
                use_cache: bool = False, position_ids: torch.Tensor | None = None) -> LMOutput:
        """Logits (B, T, V) of input_ids (B, T), which continue the cached positions if any.
        `position_ids` (B, T): packed rows' positions, restarting at 0 with each example."""
        start = 0 if past_key_values is None else past_key_values[0][0].size(2)
        T = input_ids.size(1)
        if start + T > self.config.n_positions:
            raise ValueError(f"{start + T} positions: the model has {self.config.n_positions}")
        documents = None
        if position_ids is not None:
            pos = position_ids
            document = (position_ids == 0).cumsum(dim=1)  # (B, T): which example of the row each token is in
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            documents = (document[:, :, None] == document[:, None, :]) & causal  # (B, T, T)
            documents = documents[:, None]  # (B, 1, T, T): the same for every head
        else:
            pos = torch.arange(start, start + T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        cache: list[KV] = []
        recompute = self.checkpointing is not None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            past = None if past_key_values is None else past_key_values[i]
            if recompute:
                x, kv = checkpoint(block, x, past, documents, **self.checkpointing)  # type: ignore[arg-type]
            else:
                x, kv = block(x, past, documents)
            cache.append(kv)
        return LMOutput(self.lm_head(self.ln_f(x)), cache if use_cache else None)
