"""Tokenizers, all as `tokenizers.Tokenizer`s: char, byte, byte-level BPE, pretrained, or ids (the
ids of token files as they are).

Every tokenizer built here has `<|endoftext|>`, which separates documents in the token stream.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from stagewise.config.plan_config import TokenizerConfig
from stagewise.errors import UserError

EOS = "<|endoftext|>"
UNK = "<|unk|>"
# How pretrained tokenizers name their end-of-text token, in order of preference (a
# tokenizer.json carries no "this is eos" mark, so it is found by name).
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>")
BYTE_LEVEL_MIN_VOCAB = 257  # 256 bytes + <|endoftext|>


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str], plan_dir: Path) -> Tokenizer:
    """`train_texts`: the training text (in pieces) a char tokenizer's alphabet and a BPE's merges
    come from; it is read once, and not at all by the other kinds."""
    if cfg.kind == "char":
        return _char(train_texts)
    if cfg.kind == "byte":
        return _byte_level(BYTE_LEVEL_MIN_VOCAB, [])
    if cfg.kind == "bpe":
        assert cfg.vocab_size is not None and cfg.vocab_size >= BYTE_LEVEL_MIN_VOCAB  # the schema's bounds
        return _byte_level(cfg.vocab_size, train_texts)
    if cfg.kind == "ids":
        assert cfg.vocab_size is not None  # the schema requires it
        return _ids(cfg.vocab_size)
    assert cfg.path is not None  # the schema requires it for pretrained
    return _pretrained(cfg.path, plan_dir)


def _char(texts: Iterable[str]) -> Tokenizer:
    """One token per character of the training text, in sorted order (id = rank, as nanoGPT's
    char model), then <|endoftext|> and <|unk|> for characters not seen in training."""
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    chars = sorted(seen)
    vocab = {c: i for i, c in enumerate([*chars, EOS, UNK])}
    # BPE without merges and without a pre-tokenizer: each character of the text is a token,
    # and nothing is lost to whitespace splitting. (A WordLevel model behind a per-character
    # Split pre-tokenizer does the same, 3-4x slower.)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()  # join tokens without the default space between them
    tok.add_special_tokens([EOS, UNK])
    return tok


def _byte_level(vocab_size: int, texts: Iterable[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE: lossless on any UTF-8. With vocab_size 257 it has no merges,
    i.e. it is the byte tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _ids(vocab_size: int) -> Tokenizer:
    """Token i is the text "i" (ids of token files made by an unknown tokenizer: generated text
    shows ids), then <|endoftext|> and <|unk|> (anything else a prompt holds)."""
    vocab = {**{str(i): i for i in range(vocab_size)}, EOS: vocab_size, UNK: vocab_size + 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS, UNK])
    return tok


def _pretrained(path: str, plan_dir: Path) -> Tokenizer:
    """A directory with tokenizer.json, such a file, another Hugging Face tokenizer directory, or a
    hub name."""
    local = plan_dir / Path(path).expanduser()
    if local.is_file():
        try:
            tok = Tokenizer.from_file(str(local))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception on a file it cannot parse
            raise UserError("tokenizer.path", f"'{local}' is not a tokenizer file: {e}".splitlines()[0]) from None
    elif (local / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(local / "tokenizer.json"))
    elif local.is_dir() or not path.startswith((".", "/", "~")):
        from transformers import AutoTokenizer  # slow to import; only this kind needs it

        try:
            tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else path).backend_tokenizer
        except (OSError, ValueError) as e:
            raise UserError("tokenizer.path", f"cannot load tokenizer '{path}': {e}".splitlines()[0]) from None
    else:
        raise UserError("tokenizer.path", f"no directory '{local}'")
    if not any(tok.token_to_id(name) is not None for name in EOS_NAMES):
        raise UserError("tokenizer.path", f"'{path}' has no end-of-text token (looked for "
                                          f"{', '.join(EOS_NAMES)})")
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of the token that separates documents."""
    for name in EOS_NAMES:
        if (i := tok.token_to_id(name)) is not None:
            return i
    raise ValueError(f"tokenizer has no end-of-text token (looked for {', '.join(EOS_NAMES)})")


def save_tokenizer(tok: Tokenizer, directory: Path) -> Path:
    """Write `directory/tokenizer.json` (what `kind: pretrained` reads back)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def save_auto_tokenizer(tok: Tokenizer, directory: Path, chat_template: str | None) -> None:
    """Write the files AutoTokenizer loads: what transformers' `PreTrainedTokenizerFast` wrapping
    `tok` with its eos (and unk, if any) writes with `save_pretrained`, byte for byte
    (tests/test_data.py compares them), and the chat template. Written here because importing
    transformers costs ~0.7 s of CPU at the end of every run whose model is stagewise's own."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"backend": "tokenizers", "eos_token": tok.id_to_token(eos_id(tok)),
              "model_max_length": int(1e30),  # transformers' "no limit" (VERY_LARGE_INTEGER)
              "tokenizer_class": "TokenizersBackend", "unk_token": UNK if tok.token_to_id(UNK) is not None else None}
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
    if tok.post_processor is None:  # transformers gives it one that adds no special tokens
        tok = Tokenizer.from_str(tok.to_str())
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tok.save(str(directory / "tokenizer.json"))


# --- symbols the tokenizer does not know --------------------------------------------------------


def unk_id(tok: Tokenizer) -> int | None:
    """The id unknown symbols become (None: the tokenizer has no unknown token, e.g. byte-level)."""
    unk = getattr(tok.model, "unk_token", None)
    return tok.token_to_id(unk) if isinstance(unk, str) else None


def unknown_in(encodings: Iterable[Encoding], texts: Sequence[str], unk: int | None) -> Counter[str]:
    """The symbols of `texts` that their encodings map to the unknown token, by count. Nothing is
    dropped from the ids (the unknown token stands in for each), but decoding skips it, and the
    model learns nothing of what it was: so preparation reports them (`unknown_report`)."""
    found: Counter[str] = Counter()
    if unk is None:
        return found
    for encoding, text in zip(encodings, texts, strict=True):
        for i, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if i == unk:
                found[text[start:end]] += 1
    return found


def count_unknown(tok: Tokenizer, texts: Sequence[str]) -> Counter[str]:
    return unknown_in(tok.encode_batch(list(texts), add_special_tokens=False), texts, unk_id(tok))


def unknown_report(found: Counter[str], what: str) -> str | None:
    """One line on the unknown symbols of `what` ("12 training examples", "the prompt"), or None."""
    if not found:
        return None
    total = sum(found.values())
    shown = ", ".join(f"{symbol!r} x{n}" for symbol, n in found.most_common(5))
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return (f"{total} symbol{'s' if total > 1 else ''} of {what} unknown to the tokenizer, encoded as its "
            f"unknown token ({shown}{more})")


def warn_unknown(found: Counter[str], where: str, what: str) -> None:
    """The report of `unknown_report` as a one-line warning on stderr."""
    line = unknown_report(found, what)
    if line is not None:
        print(f"warning: {where}: {line}", file=sys.stderr)
