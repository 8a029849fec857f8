"""Word-level vocabularies for the small task models (BiGRU classifier, taggers), built from the
training data as `tokenizers.Tokenizer`s so they save, load and encode like every other
tokenizer of the project (and count and look words up in Rust, not in a Python loop).

Both reserve id 0 for padding and id 1 for unknown words; the rest are the most frequent
training words, ties broken alphabetically (the `tokenizers` trainer's order), so the same data
always gives the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD = "<|pad|>"
UNK = "<|unk|>"  # the same unknown token as data.tokenizers' char tokenizer
PAD_ID, UNK_ID = 0, 1


def word_tokenizer(texts: Iterable[str], vocab_size: int = 10_000, lowercase: bool = True) -> Tokenizer:
    """Keras' `Tokenizer(num_words=vocab_size)` recipe for text classification: lowercase,
    split on whitespace, keep the `vocab_size` most frequent words (counting PAD and UNK),
    unknown words -> UNK. Unlike Keras, each punctuation mark is a token of its own rather than
    dropped ("!!!" and "£" say a lot about spam)."""
    tok = Tokenizer(models.WordLevel(vocab={}, unk_token=UNK))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, and each punctuation mark
    tok.train_from_iterator(texts, trainer=_trainer(vocab_size, min_count=1))
    return tok


def word_vocab(sentences: Iterable[Sequence[str]], vocab_size: int | None = None,
               min_count: int = 1) -> Tokenizer:
    """A vocabulary of already-split words (tagging: one tag per word, so one id per word).

    It has no normalizer and no pre-tokenizer: `encode(words, is_pretokenized=True)` maps each
    word, punctuation and all, to exactly one id."""
    tok = Tokenizer(models.WordLevel(vocab={}, unk_token=UNK))
    # Without a pre-tokenizer each string the trainer sees is one word: feed it the words.
    words = (word for sentence in sentences for word in sentence)
    tok.train_from_iterator(words, trainer=_trainer(vocab_size, min_count))
    return tok


def _trainer(vocab_size: int | None, min_count: int) -> trainers.WordLevelTrainer:
    if vocab_size is not None and vocab_size < 3:
        raise ValueError(f"vocab_size must leave room for a word besides {PAD} and {UNK} (got {vocab_size})")
    # The trainer's own default is 30,000 words; "no limit" has to be said with a number.
    return trainers.WordLevelTrainer(vocab_size=2**62 if vocab_size is None else vocab_size,
                                     min_frequency=min_count, special_tokens=[PAD, UNK],
                                     show_progress=False)
