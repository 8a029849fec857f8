"""A small bidirectional-GRU text classifier: the Keras reference recipe
(Embedding -> Bidirectional(GRU) -> Dense ReLU -> Dense to classes) in PyTorch.

Padding is handled with `pack_padded_sequence`, not masked pooling: the recipe classifies from
the GRUs' final states, and packing makes each direction's final state the one at the
sequence's true end (the backward GRU starts at the last real token, not at the padding), the
way Keras' `mask_zero=True` does. Masked pooling would be a different model. It also makes the
logits exactly independent of how much padding a batch has.

Differences from Keras worth knowing: torch's default initializations (Keras uses Glorot-uniform
kernels, orthogonal recurrent weights, uniform(-0.05, 0.05) embeddings); torch's GRU applies the
reset gate after the recurrent matmul, as Keras' default `reset_after=True` does. The model
returns logits; the softmax is in the loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stagewise.config.plan_config import ArchSettings
from stagewise.config.registry import register_arch


class BiGRUTaggerSettings(ArchSettings):
    embed_dim: int = 128
    """Width of the word embeddings."""
    hidden: int = 64
    """Hidden size of each GRU direction."""
    dropout: float = 0.0
    """Dropout before the output layer (a stage's `dropout` replaces it)."""


class BiGRUSettings(BiGRUTaggerSettings):
    dense: int = 64
    """Width of the ReLU layer between the GRUs' final states and the classes."""


@register_arch("bigru", BiGRUSettings, kind="classify")
class BiGRUClassifier(nn.Module):
    def __init__(self, *, num_classes: int, vocab_size: int = 10_000, embed_dim: int = 128,
                 hidden: int = 64, dense: int = 64, dropout: float = 0.0, pad_id: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * hidden, dense)
        self.dropout = nn.Dropout(dropout)  # 0 in the recipe; a stage's dropout reaches it (DropoutControl)
        self.out = nn.Linear(dense, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes) for right-padded input_ids (B, T); attention_mask (B, T) is 1
        on real tokens (None: no padding). Every row needs at least one real token."""
        if attention_mask is None:
            lengths = torch.full((input_ids.size(0),), input_ids.size(1), dtype=torch.int64)
        else:
            lengths = attention_mask.sum(dim=1).to(device="cpu", dtype=torch.int64)  # packing wants them on CPU
        if bool((lengths == 0).any()):
            raise ValueError("a row of input_ids has no tokens (attention_mask is all 0)")
        packed = pack_padded_sequence(self.embed(input_ids), lengths, batch_first=True, enforce_sorted=False)
        _, final = self.gru(packed)  # (2, B, hidden): forward's state after the last real token, backward's after the first
        features = torch.cat([final[0], final[1]], dim=-1)
        return self.out(self.dropout(torch.relu(self.dense(features))))


@register_arch("bigru", BiGRUTaggerSettings, kind="tag")
class BiGRUTagger(nn.Module):
    """Token classification: Embedding -> BiGRU -> a linear layer per word to tag logits.
    Packed like the classifier, so a word's logits do not depend on the batch's padding."""

    def __init__(self, *, num_tags: int, vocab_size: int, embed_dim: int = 128, hidden: int = 64,
                 dropout: float = 0.0, pad_id: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, num_tags)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, num_tags) for right-padded input_ids (B, T); padding positions get 0s."""
        lengths = attention_mask.sum(dim=1).to(device="cpu", dtype=torch.int64)
        packed = pack_padded_sequence(self.embed(input_ids), lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=input_ids.size(1))
        return self.out(self.dropout(hidden))
