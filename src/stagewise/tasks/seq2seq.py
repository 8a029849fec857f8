"""The `seq2seq` task for the built-in encoder-decoder (models.seq2seq.TransformerSeq2Seq) and
transformers' t5 / bart built from config: (source, target) files -> word vocabularies (one per
side; one for both for t5 / bart, whose embeddings are shared) -> teacher-forced batches, their
loss, and validation BLEU / chrF (sacrebleu) with greedy or beam decoding.

The target vocabulary keeps case (BLEU is case-sensitive); both sides split
off punctuation; a decoded target is joined with spaces and then `detokenize`d (sacrebleu
expects detokenized text, and its 13a tokenizer splits punctuation off again for scoring).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from stagewise.data.tables import Field
from stagewise.models.seq2seq import TransformerSeq2Seq, until_eos
from stagewise.tasks.base import Batch, ExampleTask
from stagewise.tasks.batches import split_records
from stagewise.tasks.encode import IGNORE, encode_seq2seq
from stagewise.tasks.metrics import bleu, chrf
from stagewise.tasks.readers import read_pairs
from stagewise.tasks.vocab import PAD_ID, word_tokenizer

BOS, EOS = "<|bos|>", "<|eos|>"
MAX_LEN = 64  # tokens per side, and the longest decoded target, when the data sets no max_len
_BEFORE = re.compile(r" ([.,)])")
_APOSTROPHE = re.compile(r" ?' ?")


@dataclass(frozen=True)
class PairRows:
    src: torch.Tensor  # (N, S) PAD-padded
    tgt_in: torch.Tensor  # (N, T) BOS + target, PAD-padded
    tgt_out: torch.Tensor  # (N, T) target + EOS, -100-padded
    references: tuple[str, ...]  # the raw targets, for BLEU / chrF

    def __len__(self) -> int:
        return self.src.size(0)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src, tgt_in, tgt_out = self.src[index], self.tgt_in[index], self.tgt_out[index]
        s = int((src != PAD_ID).sum(dim=1).max())
        t = int((tgt_out != IGNORE).sum(dim=1).max())
        return src[:, :s], tgt_in[:, :t], tgt_out[:, :t]


@dataclass(frozen=True)
class PairData:
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    bos_id: int
    eos_id: int
    train: PairRows
    val: PairRows


def prepare_seq2seq(train_path: Path, source_field: Field, target_field: Field, *, val_path: Path | None = None,
                    val_fraction: float = 0.1, seed: int = 0, vocab_size: int = 10_000,
                    max_len: int = MAX_LEN, fmt: str | None = None, shared_vocab: bool = False) -> PairData:
    """`shared_vocab`: one vocabulary of both sides' words (t5, bart), else one per side."""
    records = read_pairs(train_path, source_field, target_field, fmt)
    if val_path is not None:
        train, val = records, read_pairs(val_path, source_field, target_field, fmt)
    else:
        train, val = split_records(records, val_fraction, seed)
    if shared_vocab:
        src_tok = tgt_tok = word_tokenizer((text for pair in train for text in pair), vocab_size, lowercase=False)
    else:
        src_tok = word_tokenizer((s for s, _ in train), vocab_size, lowercase=False)
        tgt_tok = word_tokenizer((t for _, t in train), vocab_size, lowercase=False)
    tgt_tok.add_special_tokens([BOS, EOS])
    bos, eos = tgt_tok.token_to_id(BOS), tgt_tok.token_to_id(EOS)

    def rows(part: list[tuple[str, str]]) -> PairRows:
        tensors = encode_seq2seq(part, src_tok, tgt_tok, max_len, PAD_ID, bos, eos)
        return PairRows(*tensors, tuple(t for _, t in part))
    return PairData(src_tok, tgt_tok, bos, eos, rows(train), rows(val))


def logits_of(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) of the built-in model or a transformers encoder-decoder."""
    if isinstance(model, TransformerSeq2Seq):
        return model(src, tgt_in)
    return model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt_in,
                 decoder_attention_mask=tgt_in != PAD_ID, use_cache=False).logits


def decode(model: nn.Module, src: torch.Tensor, max_len: int, bos: int, eos: int, beam: int = 1) -> torch.Tensor:
    """(B, L) generated tokens, EOS then padding ending each row that finished (greedy when beam
    is 1). A transformers model decodes with its own `generate` (its beam search hands a
    finished hypothesis's slot on, see TransformerSeq2Seq.beam_search)."""
    if isinstance(model, TransformerSeq2Seq):
        return model.greedy(src, max_len, bos, eos) if beam == 1 else model.beam_search(src, beam, max_len, bos, eos)
    out = model.generate(input_ids=src, attention_mask=src != PAD_ID, max_new_tokens=max_len, num_beams=beam,
                         do_sample=False, decoder_start_token_id=bos, eos_token_id=eos, pad_token_id=PAD_ID)
    return out[:, 1:]  # (B, 1 + L) from generate: the decoder start token first


def seq2seq_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (and EOS) under teacher forcing."""
    src, tgt_in, tgt_out = batch
    logits = logits_of(model, src, tgt_in).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def translate(model: nn.Module, data: PairData, src: torch.Tensor, max_len: int, beam: int = 1) -> list[str]:
    """Decoded targets as text (greedy when beam is 1)."""
    tokens = decode(model, src, max_len, data.bos_id, data.eos_id, beam)
    texts = data.tgt_tokenizer.decode_batch(until_eos(tokens, data.eos_id), skip_special_tokens=True)
    return [detokenize(text) for text in texts]


def detokenize(text: str) -> str:
    """Undo the word tokenizer's spaces where written text has none: before . , ) and around
    apostrophes ("l ' homme ." -> "l'homme."). French spaces before ! ? : ; stay, as they are
    written so."""
    return _APOSTROPHE.sub("'", _BEFORE.sub(r"\1", text))


@torch.no_grad()
def evaluate_seq2seq(model: nn.Module, data: PairData, batch_size: int, device: torch.device,
                     max_len: int = MAX_LEN, beam: int = 1) -> dict[str, float]:
    """val_loss (token-weighted), val_bleu and val_chrf of decoded validation sources."""
    was_training = model.training
    model.eval()
    total, count, hypotheses = 0.0, 0, []
    for start in range(0, len(data.val), batch_size):
        src, tgt_in, tgt_out = (t.to(device) for t in data.val.rows(torch.arange(start, min(start + batch_size, len(data.val)))))
        n = int((tgt_out != IGNORE).sum())
        total += seq2seq_loss(model, (src, tgt_in, tgt_out)).item() * n
        count += n
        hypotheses += translate(model, data, src, max_len, beam)
    model.train(was_training)
    references = list(data.val.references)
    return {"val_loss": total / count, "val_bleu": bleu(hypotheses, references),
            "val_chrf": chrf(hypotheses, references)}


class Seq2SeqTask(ExampleTask):
    kind = "seq2seq"

    def __init__(self, model: nn.Module, device: torch.device, autocast: Any, data: PairData,
                 beam: int, max_len: int) -> None:
        super().__init__(model, device, autocast, data.train, data.src_tokenizer.get_vocab_size())
        self.data, self.beam, self.max_len = data, beam, max_len

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        return seq2seq_loss(self.model, batch)  # type: ignore[arg-type, arg-type]

    def metrics(self, batch_size: int) -> dict[str, float]:
        return evaluate_seq2seq(self.model, self.data, batch_size, self.device,  # type: ignore[arg-type]
                                self.max_len, self.beam)
