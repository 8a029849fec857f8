"""Records -> padded int64 tensors, one function per task.

Tokenization goes through `Tokenizer.encode_batch` (Rust, all records at once); everything after
it is numpy on flat arrays, with Python loops at most once per record, never per token. Rows are
right-padded to the longest row of the set (at most `max_len`); a batcher can trim further.
Labels use -100 where nothing is to be learned (prompt tokens, padding): torch's cross_entropy
ignores it by default, and transformers' models expect it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from itertools import chain

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer

from stagewise.data.tokenizers import unk_id, unknown_in
from stagewise.errors import UserError
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.readers import Records, where_of

IGNORE = -100


def targets(labels: torch.Tensor) -> torch.Tensor:
    """How many targets each row of (B, T) labels holds: the tokens a loss over them averages."""
    return (labels != IGNORE).sum(dim=1)


def encode_sft(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, eos_id: int, max_len: int,
               pack: bool, unknown: Counter[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, labels, position_ids) for supervised fine-tuning of a causal LM on (prompt, completion).

    Each example is prompt tokens + completion tokens + EOS; labels equal input_ids on the
    completion and its EOS and are -100 on the prompt and padding. Labels are aligned with
    input_ids, not shifted: transformers' causal LMs shift them inside. Padding is eos_id on the
    right: causal attention never looks ahead, so no attention mask is needed.

    Prompt and completion are tokenized apart, so the boundary between them is exact (joined, a
    BPE merge could straddle it) and the prompt's tokens are the ones generation will see.

    Too long an example loses prompt tokens from its start; the completion (with EOS) stays
    whole unless it would leave the prompt less than half the row (or less than the whole
    prompt, if shorter), and then it is cut at its end, EOS included.

    `pack`: examples are laid end to end, in order, into rows of max_len; an example never
    straddles two rows, so every completion token keeps its label. position_ids (None unpacked)
    restart at 0 with each example (the padding after a row's last example goes on counting):
    the model embeds each example's positions as if it were alone, and reads the restarts as the
    examples' boundaries, attending within each example only (models.gpt; transformers' packed
    position_ids path). So a packed row's loss is that of its examples unpacked.

    `unknown`: counts the symbols the tokenizer maps to its unknown token (data.tokenizers).
    """
    _check_len(max_len, 2)
    _check_records(pairs)
    tok = _plain(tokenizer)
    prompt_texts, completion_texts = [p for p, _ in pairs], [c for _, c in pairs]
    prompts = tok.encode_batch(prompt_texts, add_special_tokens=False)
    completions = tok.encode_batch(completion_texts, add_special_tokens=False)
    if unknown is not None:
        unknown.update(unknown_in(prompts, prompt_texts, unk_id(tok)))
        unknown.update(unknown_in(completions, completion_texts, unk_id(tok)))
    examples: list[list[int]] = []
    prompt_lens: list[int] = []
    half = max_len // 2
    for prompt_enc, completion_enc in zip(prompts, completions, strict=True):
        prompt, completion = prompt_enc.ids, [*completion_enc.ids, eos_id]
        if len(prompt) + len(completion) > max_len:
            keep = max(max_len - len(completion), min(len(prompt), half))  # prompt tokens kept
            completion = completion[: max_len - keep]
            prompt = prompt[len(prompt) - keep:]
        examples.append(prompt + completion)
        prompt_lens.append(len(prompt))
    lengths = _lengths(examples)
    flat = _flat(examples, lengths)
    position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # within its example
    labels = np.where(position >= np.repeat(np.asarray(prompt_lens), lengths), flat, IGNORE)
    if pack:
        rows, offsets = _pack(lengths, max_len)
    else:
        rows, offsets = np.arange(len(examples)), np.zeros(len(examples), dtype=np.int64)
    shape = (int(rows[-1]) + 1, int((offsets + lengths).max()))
    where = (np.repeat(rows, lengths), np.repeat(offsets, lengths) + position)
    input_ids = np.full(shape, eos_id, dtype=np.int64)
    input_ids[where] = flat
    label_rows = np.full(shape, IGNORE, dtype=np.int64)
    label_rows[where] = labels
    if not pack:
        return torch.from_numpy(input_ids), torch.from_numpy(label_rows), None
    positions = np.broadcast_to(np.arange(shape[1]), shape).copy()
    positions[where] = position
    fill = np.maximum.accumulate(np.where(positions == 0, np.arange(shape[1]), 0), axis=1)  # the last restart
    pad = np.ones(shape, dtype=bool)
    pad[where] = False
    positions = np.where(pad, np.arange(shape[1]) - fill, positions)  # the padding continues the last example
    return torch.from_numpy(input_ids), torch.from_numpy(label_rows), torch.from_numpy(positions)


def _pack(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and offset of each example, filling rows in order (next-fit: deterministic, and
    examples keep their order, so an epoch over rows is an epoch over examples)."""
    rows = np.empty(len(lengths), dtype=np.int64)
    offsets = np.empty(len(lengths), dtype=np.int64)
    row = used = 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > max_len:
            row, used = row + 1, 0
        rows[i], offsets[i] = row, used
        used += n
    return rows, offsets


def encode_classification(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, label_map: LabelMap,
                          max_len: int, pad_id: int,
                          unknown: Counter[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) for (text, label) records: the first max_len tokens
    of each text (with the tokenizer's own special tokens, e.g. BERT's [CLS]/[SEP]), right-padded
    with pad_id; labels are label_map ids, shape (N,). An unseen label or a text with no tokens
    is a UserError naming the record's file and row. `unknown`: as encode_sft's."""
    _check_len(max_len, 1)
    _check_records(pairs)
    where = where_of(pairs)
    texts = [text for text, _ in pairs]
    tok = _plain(tokenizer)
    encodings = tok.encode_batch(texts)
    if unknown is not None:
        unknown.update(unknown_in(encodings, texts, unk_id(tok)))
    ids = _truncated(encodings, max_len, where, "text")
    labels = label_map.encode_many([label for _, label in pairs], where)
    input_ids, mask = _padded(ids, pad_id)
    return _tensors(input_ids, mask, labels)


def encode_seq2seq(pairs: Sequence[tuple[str, str]], src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: int,
                   pad_id: int, bos_id: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, tgt_in, tgt_out) for (source, target) records, for teacher forcing.

    src: the source's first max_len tokens (no BOS/EOS: the encoder sees the whole source at
    once), padded with pad_id. With target = BOS t1..tn EOS, tgt_in is all but its last token
    and tgt_out all but its first, both cut to max_len (a cut target loses its EOS, and is not
    taught to stop there); tgt_in is padded with pad_id, tgt_out with -100."""
    _check_len(max_len, 1)
    _check_records(pairs)
    assert len({pad_id, bos_id, eos_id}) == 3, "pad, bos and eos must be different tokens"
    where = where_of(pairs)
    src = _truncated(_plain(src_tok).encode_batch([s for s, _ in pairs], add_special_tokens=False),
                     max_len, where, "source")
    targets = _plain(tgt_tok).encode_batch([t for _, t in pairs], add_special_tokens=False)
    tgt_in = [[bos_id, *t.ids[: max_len - 1]] for t in targets]
    tgt_out = [[*t.ids, eos_id][:max_len] for t in targets]
    return _tensors(_padded(src, pad_id)[0], _padded(tgt_in, pad_id)[0],
                    _padded(tgt_out, IGNORE)[0])


def encode_tagging(sentences: Sequence[tuple[Sequence[str], Sequence[str]]], vocab: Tokenizer,
                   tag_map: LabelMap, max_len: int,
                   pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, tags) for (words, tags) sentences: one id per word from a
    word-level vocabulary (vocab.word_vocab: unknown words -> its UNK id), the first max_len
    words of each sentence; tags are tag_map ids, -100 on padding. A tag unseen in training is
    a UserError naming the file line of the word."""
    _check_len(max_len, 1)
    _check_records(sentences)
    words = [list(w[:max_len]) for w, _ in sentences]
    tags = [list(t[:max_len]) for _, t in sentences]
    encodings = _plain(vocab).encode_batch(words, is_pretokenized=True, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    for n, (w, t, i) in enumerate(zip(words, tags, ids, strict=True)):
        if not len(w) == len(t) == len(i):
            raise ValueError(f"sentence {n}: {len(w)} words, {len(t)} tags, {len(i)} ids "
                             "(the vocabulary must map each word to one id: build it with word_vocab)")
    lengths = _lengths(ids)
    sentence_of = np.repeat(np.arange(len(ids)), lengths)
    word_of = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)

    def where(k: int) -> str:  # the k-th word of all: in a CoNLL file, one word per line
        s, w = int(sentence_of[k]), int(word_of[k])
        if isinstance(sentences, Records):
            return f"{sentences.path}:{sentences.lines[s] + w}"
        return f"record {s + 1}, word {w + 1}"

    tag_ids = tag_map.encode_many(list(chain.from_iterable(tags)), where)
    input_ids, mask = _padded(ids, pad_id)
    tag_rows = np.full(mask.shape, IGNORE, dtype=np.int64)
    tag_rows[mask] = tag_ids
    return _tensors(input_ids, mask, tag_rows)


# --- helpers -----------------------------------------------------------------------------------


def _plain(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without padding or truncation: a pretrained tokenizer.json may carry either,
    and encode_batch would then pad or cut rows behind our back. A copy, so the caller's
    tokenizer is left as it is."""
    if tokenizer.padding is None and tokenizer.truncation is None:
        return tokenizer
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def _truncated(encodings: list[Encoding], max_len: int, where: Callable[[int], str],
               what: str) -> list[list[int]]:
    ids = [e.ids[:max_len] for e in encodings]
    for i, row in enumerate(ids):
        if not row:
            raise UserError(where(i), f"the {what} has no tokens (the tokenizer drops all of it)")
    return ids


def _lengths(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))


def _flat(rows: Sequence[Sequence[int]], lengths: np.ndarray) -> np.ndarray:
    return np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))


def _padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows right-padded to the longest, and the (bool) mask of real tokens."""
    lengths = _lengths(rows)
    mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
    out = np.full(mask.shape, pad, dtype=np.int64)
    out[mask] = _flat(rows, lengths)  # a boolean mask fills row by row, left to right
    return out, mask


def _tensors(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 tensors; attention masks too, as transformers' models take them."""
    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.int64, copy=False))
    return t(a), t(b), t(c)


def _check_records(records: Sequence[object]) -> None:
    if len(records) == 0:
        raise ValueError("no records to encode")


def _check_len(max_len: int, least: int) -> None:
    if max_len < least:
        raise ValueError(f"max_len must be >= {least} (got {max_len})")
