"""An encoder-decoder Transformer for translation-like tasks, on `torch.nn.Transformer`, with
greedy and beam-search decoding.

Choices: pre-LayerNorm layers by default (`norm_first`: trains stably from scratch without a
long warmup, which small task runs do not have); sinusoidal positions (no parameters, any length
up to `max_positions`); embeddings scaled by sqrt(d_model) as in "Attention Is All You Need";
the output projection shares the target embedding's weights unless `tie_output=False`.

Decoding re-runs the decoder over the whole prefix at each step (nn.Transformer has no key/value
cache): O(T^2) per sequence, fine for sentence-length outputs. Both decoders are batched over
the sources (and over the beams); they do not change train/eval mode: call `model.eval()` first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stagewise.config.plan_config import ArchSettings
from stagewise.config.registry import register_arch


class TransformerSettings(ArchSettings):
    d_model: int = 256
    """Width of the embeddings and layers."""
    nhead: int = 8
    """Attention heads (they split d_model)."""
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    dim_feedforward: int = 1024
    """Width of each layer's feed-forward block."""
    dropout: float = 0.1
    """The model's own dropout rate (a stage's `dropout` replaces it)."""
    max_positions: int = 1024
    """The longest sequence (sinusoidal positions)."""
    norm_first: bool = True
    """Pre-LayerNorm layers."""
    tie_output: bool = True
    """The output projection shares the target embedding's weights."""


@register_arch("transformer", TransformerSettings, kind="seq2seq")
class TransformerSeq2Seq(nn.Module):
    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, *, d_model: int = 256, nhead: int = 8,
                 num_encoder_layers: int = 3, num_decoder_layers: int = 3, dim_feedforward: int = 1024,
                 dropout: float = 0.1, pad_id: int = 0, max_positions: int = 1024, norm_first: bool = True,
                 tie_output: bool = True) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.d_model = d_model
        self.src_embed = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        self.positions: torch.Tensor
        self.register_buffer("positions", sinusoids(max_positions, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

        def layer_norm() -> nn.LayerNorm:
            return nn.LayerNorm(d_model)

        # The encoder and decoder are built here only to pass enable_nested_tensor=False: the
        # nested-tensor fast path does not apply to pre-LN layers, and nn.Transformer's own
        # encoder would warn about that on every construction.
        encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                       norm_first=norm_first),
            num_encoder_layers, norm=layer_norm(), enable_nested_tensor=False)
        decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                       norm_first=norm_first),
            num_decoder_layers, norm=layer_norm())
        self.transformer = nn.Transformer(d_model, nhead, custom_encoder=encoder, custom_decoder=decoder,
                                          batch_first=True)
        self.out = nn.Linear(d_model, tgt_vocab_size, bias=False)
        # fairseq's embedding init: std d^-0.5, so that embeddings scaled by sqrt(d) have unit
        # size, and tied output logits start small (torch's N(0, 1) would make them ~sqrt(d)).
        for embedding in (self.src_embed, self.tgt_embed):
            nn.init.normal_(embedding.weight, std=d_model**-0.5)
            with torch.no_grad():
                embedding.weight[pad_id].zero_()
        if tie_output:
            self.out.weight = self.tgt_embed.weight

    # --- teacher forcing -------------------------------------------------------------------------

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, tgt_vocab) for right-padded src (B, S) and tgt_in (B, T) (BOS first)."""
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output (B, S, d_model) and the source padding mask (True = padding)."""
        src_pad = src == self.pad_id
        memory = self.transformer.encoder(self._embed(self.src_embed, src), src_key_padding_mask=src_pad)
        return memory, src_pad

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, tgt_vocab) at every target position, each seeing only earlier ones."""
        length = tgt_in.size(1)
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt_in.device).triu(1)  # True = may not attend
        # Boolean masks throughout: torch deprecates mixing a float causal mask with boolean padding masks.
        hidden = self.transformer.decoder(self._embed(self.tgt_embed, tgt_in), memory, tgt_mask=causal,
                                          tgt_key_padding_mask=tgt_in == self.pad_id,
                                          memory_key_padding_mask=src_pad)
        return self.out(hidden)

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if ids.size(1) > self.positions.size(0):
            raise ValueError(f"sequence of {ids.size(1)} tokens is longer than max_positions={self.positions.size(0)}")
        x = embedding(ids) * math.sqrt(self.d_model) + self.positions[: ids.size(1)]
        return self.dropout(x)

    # --- decoding --------------------------------------------------------------------------------

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int, bos: int, eos: int) -> torch.Tensor:
        """The most likely next token, step by step: (B, L) generated tokens (no BOS), each row
        ending with EOS if it produced one within max_len, then pad_id. L <= max_len is the
        longest row."""
        self._check_decoding(max_len, bos, eos)
        memory, src_pad = self.encode(src)
        tokens = torch.full((src.size(0), 1), bos, dtype=torch.long, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            step = self.decode(tokens, memory, src_pad)[:, -1].argmax(dim=-1).masked_fill(done, self.pad_id)
            tokens = torch.cat([tokens, step[:, None]], dim=1)
            done |= step == eos
            if bool(done.all()):
                break
        return tokens[:, 1:]

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam: int, max_len: int, bos: int, eos: int,
                    length_penalty: float = 1.0) -> torch.Tensor:
        """The best of `beam` hypotheses per source, as (B, L) tokens shaped like greedy's.

        Batched over sources and beams. A hypothesis's score is its total log-probability /
        length**length_penalty (length counts the EOS; 0 = raw totals, 1 = mean log-probability,
        the default, which keeps short outputs from winning just by being short). Each step,
        the `beam` best of (every one-token extension of the unfinished hypotheses, and the
        finished ones as they are) make the next beam; an extension ending in EOS is finished.
        A source is done when its whole beam is finished, or at max_len (unfinished hypotheses
        then compete as they stand).

        A finished hypothesis keeps its slot, rather than handing it to the next-best
        extension as fairseq and HF do: so the search cannot stop (after `beam` early, poor
        finishes) while a better hypothesis is still unfinished, and beam=1 is greedy decoding,
        token for token. It is a heuristic all the same: with length_penalty > 0 a hypothesis
        that fell out of the beam could have overtaken a finished one later.
        """
        self._check_decoding(max_len, bos, eos)
        vocab = self.out.out_features
        if not 1 <= beam <= vocab:
            raise ValueError(f"beam must be in [1, {vocab}] (got {beam})")
        batch, k = src.size(0), beam
        device = src.device
        memory, src_pad = self.encode(src)
        memory, src_pad = memory.repeat_interleave(k, dim=0), src_pad.repeat_interleave(k, dim=0)
        rows = torch.arange(batch, device=device)[:, None]
        tokens = torch.full((batch, k, 1), bos, dtype=torch.long, device=device)
        totals = torch.zeros(batch, k, device=device)
        totals[:, 1:] = -math.inf  # the beams start identical: extend only the first
        finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, k, device=device)  # generated tokens, EOS included
        for step in range(1, max_len + 1):
            logits = self.decode(tokens.view(batch * k, -1), memory, src_pad)[:, -1]
            extended = totals[:, :, None] + logits.log_softmax(dim=-1).view(batch, k, vocab)
            extended = extended.masked_fill(finished[:, :, None], -math.inf)  # finished: no extensions
            kept = torch.where(finished, totals, -math.inf)  # ... but themselves, as they are
            candidates = torch.cat([extended / step**length_penalty,
                                    (kept / lengths.clamp(min=1) ** length_penalty)[:, :, None]], dim=2)
            _, flat = candidates.view(batch, -1).topk(k, dim=1)  # (B, k), best first
            origin, choice = flat // (vocab + 1), flat % (vocab + 1)
            carried = choice == vocab
            token = torch.where(carried, self.pad_id, choice)  # a finished row goes on with padding, as in greedy
            totals = torch.where(carried, totals[rows, origin],
                                 extended.view(batch, -1).gather(1, origin * vocab + choice.clamp(max=vocab - 1)))
            lengths = torch.where(carried, lengths[rows, origin], float(step))
            finished = carried | (token == eos)
            tokens = torch.cat([tokens[rows, origin], token[:, :, None]], dim=2)
            if bool(finished.all()):
                break
        # The best by score; a row never finished (max_len) is scored at its full length.
        scores = totals / lengths ** length_penalty
        best = scores.argmax(dim=1)
        out = tokens[rows[:, 0], best, 1:]
        return out[:, : int(lengths[rows[:, 0], best].max())]

    def _check_decoding(self, max_len: int, bos: int, eos: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (got {max_len})")
        if len({bos, eos, self.pad_id}) != 3:
            raise ValueError(f"bos ({bos}), eos ({eos}) and pad ({self.pad_id}) must be different tokens")


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """The (length, dim) sinusoidal position table of "Attention Is All You Need"."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def until_eos(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row of decoded tokens up to (not including) its first EOS, as lists (for detokenizing
    and scoring). Rows that never produced EOS are kept whole, padding and all: decoders pad
    only after EOS."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out
