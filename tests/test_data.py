"""stagewise.data: reading corpora, tokenizers, the token cache, the window sampler."""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, processors

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data import prepared_data as prepare_module
from stagewise.data import sources
from stagewise.data.cache import token_array
from stagewise.data.documents import Documents
from stagewise.data.prepared_data import prepare_data
from stagewise.data.sampler import WindowSampler
from stagewise.data.sources import load_corpus
from stagewise.data.tokenizers import EOS, UNK, build_tokenizer, eos_id, save_auto_tokenizer, save_tokenizer
from stagewise.errors import UserError
from stagewise.tasks.batches import split_records
from stagewise.tasks.readers import read_labeled

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not here")
    return SHAKESPEARE.read_text(encoding="utf-8")


def corpus(tmp_path: Path, seed: int = 0, **cfg) -> sources.Corpus:
    return listed(load_corpus(DataConfig(**cfg), tmp_path, seed=seed, cache_dir=tmp_path / "hf"))


def listed(c: sources.Corpus) -> sources.Corpus:
    """The corpus with its splits as lists of whole documents, to compare with lists."""
    return dataclasses.replace(c, train=list(c.train.documents()), val=list(c.val.documents()))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# --- sources -------------------------------------------------------------------------------


def test_text_files_by_glob_are_whole_documents_in_sorted_order(tmp_path):
    write(tmp_path / "d/b.txt", "second\n\nfile  with spaces\n")
    write(tmp_path / "d/a.txt", "first file\nline two")
    write(tmp_path / "d/c.md", "not matched")
    c = corpus(tmp_path, train="d/*.txt", val="d/a.txt")
    assert c.train == ["first file\nline two", "second\n\nfile  with spaces\n"]
    assert c.val == ["first file\nline two"]
    assert c.files == [tmp_path / "d/a.txt", tmp_path / "d/b.txt", tmp_path / "d/a.txt"]


def test_several_patterns_keep_their_order_and_read_a_file_once(tmp_path):
    write(tmp_path / "z.txt", "zed")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / "m.jsonl", jsonl([{"text": "row one"}, {"text": "row two"}]))
    c = corpus(tmp_path, train=["z.txt", "m.jsonl", "*.txt"], val="a.txt")
    assert c.train == ["zed", "row one", "row two", "ay"]


@pytest.mark.parametrize("name, content, cfg, second", [
    ("t.jsonl", jsonl([{"text": "uno", "id": 1}, {"text": "dos\nlines", "id": 2}]), {}, "dos\nlines"),
    ("t.json", json.dumps([{"body": "uno"}, {"body": "dos\nlines"}]), {"field": "body"}, "dos\nlines"),
    ("t.ndjson", jsonl([{"text": "uno"}, {"text": "dos\nlines"}]), {}, "dos\nlines"),
    ("t.csv", 'id,text\n1,uno\n2,"dos\nlines"\n', {}, "dos\nlines"),
    # A TSV has no quoting (data.tables): a cell cannot span lines, and a quote is text.
    ("t.tsv", 'text\tlabel\nuno\tham\n"dos" lines\tspam\n', {}, '"dos" lines'),
    ("t.data", jsonl([{"text": "uno"}, {"text": "dos\nlines"}]), {"format": "json"}, "dos\nlines"),
])
def test_tables_give_one_document_per_row(tmp_path, name, content, cfg, second):
    write(tmp_path / name, content)
    c = corpus(tmp_path, train=name, val=name, **cfg)
    assert c.train == ["uno", second]


def test_parquet(tmp_path):
    pq.write_table(pa.table({"n": [1, 2, 3], "content": ["alpha", "beta", "gamma"]}), tmp_path / "t.parquet")
    c = corpus(tmp_path, train="t.parquet", field="content", val_fraction=0.25)
    assert len(c.val) == 1  # a whole row: max(1, round(3 * 0.25))
    assert sorted(c.train + c.val) == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("seed", [0, 7])
def test_a_table_holds_out_the_rows_a_task_stage_holds_out(tmp_path, seed):
    """A causal-LM stage on a task's table (ULMFiT's LM stage) must not read the rows the task
    stage validates on: same file and seed, same rows held out."""
    path = write(tmp_path / "t.tsv", "".join(f"{'spam' if i % 3 else 'ham'}\tmessage {i}\n" for i in range(40)))
    c = corpus(tmp_path, train="t.tsv", field=1, val_fraction=0.2, seed=seed)
    task_train, task_val = split_records(read_labeled(path, 1, 0), 0.2, seed)
    assert c.val == [text for text, _ in task_val] and len(c.val) == 8
    assert c.train == [text for text, _ in task_train]
    assert corpus(tmp_path, train="t.tsv", field=1, val_fraction=0.2, seed=seed + 1).val != c.val


def test_the_seed_shapes_a_table_split_only(tmp_path):
    write(tmp_path / "a.txt", "some text here")
    write(tmp_path / "t.jsonl", jsonl([{"text": f"row {i}"} for i in range(10)]))
    assert corpus(tmp_path, train="a.txt", seed=1).fingerprint == corpus(tmp_path, train="a.txt").fingerprint
    assert corpus(tmp_path, train="t.jsonl", seed=1).fingerprint != corpus(tmp_path, train="t.jsonl").fingerprint


def test_stdlib_placeholder(tmp_path):
    c = corpus(tmp_path, train="{stdlib}/json/__init__.py")
    expected = Path(sysconfig.get_paths()["stdlib"], "json/__init__.py")
    assert c.files == [expected]
    assert "".join(c.train + c.val) == expected.read_text(encoding="utf-8")


def test_val_fraction_matches_nanogpt_split(tmp_path, shakespeare):
    c = listed(load_corpus(DataConfig(train=str(SHAKESPEARE)), tmp_path, seed=0, cache_dir=tmp_path / "hf"))
    assert [len(d) for d in c.train] == [1_003_854]
    assert [len(d) for d in c.val] == [111_540]
    assert c.train[0] + c.val[0] == shakespeare


def test_fraction_split_cuts_across_documents(tmp_path):
    write(tmp_path / "a.txt", "0123456789")
    write(tmp_path / "b.txt", "abcdefghij")
    c = corpus(tmp_path, train="*.txt", val_fraction=0.3)  # cut at 14 of 20
    assert c.train == ["0123456789", "abcd"]
    assert c.val == ["efghij"]


def test_fingerprint_follows_content_and_settings(tmp_path):
    f = write(tmp_path / "a.txt", "some text here")
    first = corpus(tmp_path, train="a.txt").fingerprint
    assert corpus(tmp_path, train="a.txt").fingerprint == first
    assert corpus(tmp_path, train="a.txt", val_fraction=0.2).fingerprint != first
    stat = f.stat()
    f.write_text("some text HERE")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or a coarse clock leaves it
    edited = corpus(tmp_path, train="a.txt")
    assert edited.fingerprint != first
    assert "".join(edited.train + edited.val) == "some text HERE"  # not a stale parse


def test_hub_names_go_to_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, cache_dir=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": [f"{path} {split}"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c = corpus(tmp_path, train="hub:karpathy/tiny:plays", val="hub:wikitext")
    assert calls == [("karpathy/tiny", "plays", "train"), ("wikitext", None, "validation")]
    assert c.train == ["karpathy/tiny train"] and c.val == ["wikitext validation"]
    assert c.files == []

    def not_found(path, *args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    assert bad(tmp_path, train="hub:nobody/nothing") == (
        "data.train: hub:nobody/nothing: cannot load from the hub: Dataset 'nobody/nothing' doesn't exist on the Hub")


# --- bad data: one UserError naming the file and the problem ------------------------------


def bad(tmp_path: Path, **cfg) -> str:
    with pytest.raises(UserError) as e:
        corpus(tmp_path, **cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_no_file_matches(tmp_path):
    assert bad(tmp_path, train="nothing/*.txt") == "data.train: no file matches 'nothing/*.txt'"
    write(tmp_path / "a.txt", "text")
    assert bad(tmp_path, train="a.txt", val=["a.txt", "b.txt"]) == "data.val: no file matches 'b.txt'"


def test_empty_file(tmp_path):
    p = write(tmp_path / "e.txt", "")
    assert bad(tmp_path, train="e.txt") == f"data.train: {p}: empty file"  # and the plan key pointing at it
    p = write(tmp_path / "e.jsonl", "\n  \n")
    assert bad(tmp_path, train="e.jsonl") == f"data.train: {p}: empty file (only whitespace)"
    write(tmp_path / "t.txt", "some text")
    assert bad(tmp_path, train="t.txt", val="e.txt") == f"data.val: {tmp_path / 'e.txt'}: empty file"


def test_non_utf8_names_the_byte_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    assert bad(tmp_path, train="latin1.txt") == (
        f"data.train: {p}: not UTF-8: byte 0xe9 at offset 3 (invalid continuation byte)")


@pytest.mark.parametrize("name, encoding, where", [
    ("w.txt", "utf-16", "byte 0xff at offset 0 (invalid start byte)"),  # Windows' "Unicode": a byte-order mark
    ("w.txt", "utf-16-be", "byte 0xe9 at offset 29 (invalid continuation byte)"),  # no mark, zero bytes
    ("w.csv", "utf-16", "byte 0xff at offset 0 (invalid start byte)"),
])
def test_a_utf16_file_is_named_as_such(tmp_path, name, encoding, where):
    p = tmp_path / name
    p.write_bytes("text,label\nCaf\u00e9 au lait,a\nthe sea,b\n".encode(encoding))
    line = "1" if name.endswith(".csv") else None
    found = bad(tmp_path, train=name, **({"field": "text"} if line else {}))
    assert found == f"data.train: {p}{':' + line if line else ''}: not UTF-8: {where}; it looks like UTF-16: " \
                    "save it as UTF-8"


@pytest.mark.parametrize("name", ["m.jsonl", "m.csv", "m.parquet"])
def test_missing_column_names_the_columns_present(tmp_path, name):
    table = pa.table({"body": ["x", "y"], "label": ["a", "b"]})
    if name.endswith(".parquet"):
        pq.write_table(table, tmp_path / name)
    elif name.endswith(".csv"):
        write(tmp_path / name, "body,label\nx,a\ny,b\n")
    else:
        write(tmp_path / name, jsonl(table.to_pylist()))
    expected = {"m.parquet": ": no column 'text' (columns: body, label); set data.field",
                "m.csv": ":1: no column 'text' (header: body, label)",
                "m.jsonl": ":1: no field 'text' (fields: body, label)"}[name]
    assert bad(tmp_path, train=name) == f"data.train: {tmp_path / name}{expected}"


@pytest.mark.parametrize("name, content, message", [
    ("n.jsonl", jsonl([{"text": "ok"}, {"text": "ok"}, {"text": 7}]), "3: text in 'text' is a number (7), not a string"),
    ("n.jsonl", jsonl([{"text": "ok"}, {"text": ["a"]}]), '2: text in \'text\' is an array (["a"]), not a string'),
    ("n.jsonl", jsonl([{"text": "ok"}, {"text": None}]), "2: text in 'text' is null, not a string"),
    ("n.jsonl", jsonl([{"text": "ok"}, {"other": "x"}]), "2: no field 'text' (fields: other)"),
    ("n.csv", "text,label\nok,1\n,2\n", "3: empty text in 'text'"),
])
def test_non_string_row_names_the_row(tmp_path, name, content, message):
    write(tmp_path / name, content)
    assert bad(tmp_path, train=name) == f"data.train: {tmp_path / name}:{message}"


@pytest.mark.parametrize("name, content, reason", [
    ("u.jsonl", '{"text": "ok"}\n{"text": \n', ":2: not valid JSON: Expecting value"),
    ("u.csv", 'text,label\n"unterminated,1\n', ":2: cannot read as CSV: unexpected end of data"),
    ("u.csv", "text,label\n", ": no records (only a header)"),
])
def test_unparseable_text_tables(tmp_path, name, content, reason):
    write(tmp_path / name, content)
    assert bad(tmp_path, train=name).startswith(f"data.train: {tmp_path / name}{reason}")


def test_unparseable_parquet(tmp_path):
    (tmp_path / "u.parquet").write_bytes(b"PAR1 this is not parquet")
    assert bad(tmp_path, train="u.parquet").startswith(f"data.train: {tmp_path / 'u.parquet'}: cannot read as parquet: ")


def test_too_little_text_to_hold_out(tmp_path):
    write(tmp_path / "a.txt", "a")
    assert bad(tmp_path, train="a.txt", val_fraction=0.2) == (
        "data.val_fraction: too little training text (1 characters) to hold out 0.2 of it")
    p = write(tmp_path / "one.jsonl", jsonl([{"text": "only row"}]))
    assert bad(tmp_path, train="one.jsonl", val_fraction=0.2) == (
        f"data.train: {p}: val_fraction 0.2 of 1 rows leaves none for training")


# --- tokenizers ----------------------------------------------------------------------------


def test_char_tokenizer_on_shakespeare(tmp_path, shakespeare):
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare[:1_003_854]], tmp_path)
    vocab = tok.get_vocab()
    assert tok.get_vocab_size() == 65 + 2
    assert sorted(vocab, key=vocab.get)[:65] == sorted(set(shakespeare))  # id = rank of the char
    assert tok.id_to_token(eos_id(tok)) == EOS
    val = shakespeare[1_003_854:]
    ids = tok.encode(val).ids
    assert len(ids) == len(val) and tok.decode(ids) == val
    assert tok.encode("a\u00e9b").ids == [vocab["a"], vocab[UNK], vocab["b"]]


def test_char_tokenizer_keeps_spaces_and_newlines(tmp_path):
    text = "  two  spaces\n\n\tand tabs \r\n"
    tok = build_tokenizer(TokenizerConfig(kind="char"), [text], tmp_path)
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(text).ids) == len(text)


def test_byte_tokenizer_round_trips_any_utf8(tmp_path):
    tok = build_tokenizer(TokenizerConfig(kind="byte"), [], tmp_path)
    assert tok.get_vocab_size() == 257
    text = "na\u00efve caf\u00e9 \U0001f389\U0001f468\u200d\U0001f469\n \u4e2d\u6587\t\u00a0end  "
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bpe_respects_vocab_size_and_is_deterministic(tmp_path, shakespeare):
    cfg = TokenizerConfig(kind="bpe", vocab_size=400)
    texts = [shakespeare[:200_000]]
    tok = build_tokenizer(cfg, texts, tmp_path)
    assert tok.get_vocab_size() == 400
    assert build_tokenizer(cfg, texts, tmp_path).to_str() == tok.to_str()
    sample = shakespeare[500_000:501_000] + " \u00e9\U0001f389"
    ids = tok.encode(sample).ids
    assert len(ids) < len(sample.encode()) * 0.6  # merges were learnt
    assert tok.decode(ids) == sample


def test_bpe_vocab_below_the_byte_alphabet_is_refused_by_the_plan():
    from stagewise.plan.load import validate_plan

    raw = {"name": "x", "model": {"arch": "gpt2"}, "tokenizer": {"kind": "bpe", "vocab_size": 100},
           "data": {"train": "a.txt"}, "stages": [{"name": "a", "steps": 1, "batch": {"size": 1}}]}
    with pytest.raises(UserError, match=r"tokenizer.vocab_size: input should be greater than or equal to 257"):
        validate_plan(raw, "plan.yaml")


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_transformers_round_trip(tmp_path, kind):
    from transformers import AutoTokenizer

    text = "To be, or not to be:\nthat is the question.\n"
    tok = build_tokenizer(TokenizerConfig(kind=kind), [text], tmp_path)
    save_auto_tokenizer(tok, tmp_path / "hf", None)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.eos_token == EOS and loaded.eos_token_id == eos_id(tok)
    probe = text + "Q\u00e9?"
    assert loaded.encode(probe) == tok.encode(probe).ids
    assert loaded.decode(loaded.encode(text)) == text


def _tokenizers_of_every_kind(tmp_path: Path) -> dict[str, Tokenizer]:
    text = "To be, or not to be:\nthat is the question.\n" * 20
    made = {kind: build_tokenizer(TokenizerConfig(kind=kind, vocab_size=300 if kind == "bpe" else None), [text], tmp_path)
            for kind in ("char", "byte", "bpe")}
    with_bos = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), [text], tmp_path)
    with_bos.add_special_tokens(["<s>"])  # a pretrained tokenizer's own post-processor is kept
    with_bos.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                            special_tokens=[("<s>", with_bos.token_to_id("<s>"))])
    plain_eos = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "</s>": 2}, merges=[]))
    plain_eos.add_tokens(["</s>"])  # an end-of-text token not marked special
    return {**made, "pretrained_with_bos": with_bos, "pretrained_plain_eos": plain_eos}


@pytest.mark.parametrize("chat_template", [None, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"])
def test_the_auto_tokenizer_files_are_those_transformers_writes(tmp_path, chat_template):
    """save_auto_tokenizer writes, byte for byte, what transformers' save_pretrained writes for
    the tokenizer wrapped with its eos and unk (how exports wrote it before: a run whose model is
    stagewise's own then never imports transformers)."""
    from transformers import PreTrainedTokenizerFast

    for name, tok in _tokenizers_of_every_kind(tmp_path).items():
        unk = UNK if tok.token_to_id(UNK) is not None else None
        wrapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_str()),
                                          eos_token=tok.id_to_token(eos_id(tok)), unk_token=unk)
        if chat_template is not None:
            wrapped.chat_template = chat_template
        wrapped.save_pretrained(tmp_path / name / "transformers")
        before = tok.to_str()
        save_auto_tokenizer(tok, tmp_path / name / "ours", chat_template)
        assert tok.to_str() == before, name  # the plan's tokenizer itself is left as it was
        theirs = {p.name: p.read_bytes() for p in (tmp_path / name / "transformers").iterdir()}
        ours = {p.name: p.read_bytes() for p in (tmp_path / name / "ours").iterdir()}
        assert ours == theirs, name


def test_pretrained_from_a_saved_directory(tmp_path):
    text = "hello there, general kenobi\n"
    tok = build_tokenizer(TokenizerConfig(kind="char"), [text], tmp_path)
    save_tokenizer(tok, tmp_path / "tok")
    again = build_tokenizer(TokenizerConfig(kind="pretrained", path="tok"), [], tmp_path)
    assert again.encode(text).ids == tok.encode(text).ids
    assert eos_id(again) == eos_id(tok)
    with pytest.raises(UserError, match="tokenizer.path: no directory"):
        build_tokenizer(TokenizerConfig(kind="pretrained", path="./missing"), [], tmp_path)


# --- token cache ---------------------------------------------------------------------------


class CountingTokenizer:
    """A tokenizer that counts batch encodes (tokenizers.Tokenizer cannot be monkeypatched)."""

    def __init__(self, tok):
        self.tok = tok
        self.batches = 0

    def encode_batch_fast(self, texts, **kwargs):
        self.batches += 1
        return self.tok.encode_batch_fast(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_token_cache_writes_once_and_reuses(tmp_path):
    docs = ["abc", "", "cab"]
    tok = CountingTokenizer(build_tokenizer(TokenizerConfig(kind="char"), docs, tmp_path))
    first = token_array(Documents.of(docs), tok, tmp_path / "tokens", "k1")
    eos, (a, b, c) = eos_id(tok.tok), (tok.token_to_id(ch) for ch in "abc")
    assert first.tolist() == [a, b, c, eos, eos, c, a, b]  # eos between documents only
    assert isinstance(first, np.memmap) and first.dtype == np.uint16 and not first.flags.writeable
    assert json.loads((tmp_path / "tokens/k1.json").read_text())["length"] == 8
    assert tok.batches == 1

    again = token_array(Documents.of(docs), tok, tmp_path / "tokens", "k1")
    assert tok.batches == 1  # reused, not retokenized
    assert np.array_equal(again, first)
    token_array(Documents.of(docs), tok, tmp_path / "tokens", "k2")
    assert tok.batches == 2
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["k1.bin", "k1.json", "k2.bin", "k2.json"]


def test_token_cache_rewrites_an_incomplete_entry(tmp_path):
    tok = CountingTokenizer(build_tokenizer(TokenizerConfig(kind="byte"), [], tmp_path))
    first = token_array(Documents.of(["hello"]), tok, tmp_path, "k").tolist()
    (tmp_path / "k.bin").write_bytes(b"\0")  # e.g. a disk-full write
    assert token_array(Documents.of(["hello"]), tok, tmp_path, "k").tolist() == first
    assert tok.batches == 2


def test_token_cache_uses_uint32_past_65536_ids(tmp_path):
    text = "".join(map(chr, range(0x10000, 0x10000 + 65_600)))
    tok = build_tokenizer(TokenizerConfig(kind="char"), [text], tmp_path)
    tokens = token_array(Documents.of([text]), tok, tmp_path, "big")
    assert tokens.dtype == np.uint32 and int(tokens.max()) == 65_599


# --- sampler -------------------------------------------------------------------------------


def test_windows_are_shifted_by_one(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    s = WindowSampler(tokens, block_size=16, batch_size=4, seed=0)
    assert s.windows_per_epoch == 62  # (1000 - 1) // 16
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert (x[:, 0] % 16 == 0).all()  # windows start at multiples of the block size


def starts(batches) -> list[int]:
    return [int(row[0]) // 8 for x, _ in batches for row in x]


def test_each_epoch_is_a_permutation_of_all_windows():
    s = WindowSampler(np.arange(8 * 25 + 1), block_size=8, batch_size=7, seed=3)
    epochs = []
    for _ in range(3):
        epochs.append(starts(s.epoch_batches()))
    assert [sorted(e) for e in epochs] == [list(range(25))] * 3
    assert len({tuple(e) for e in epochs}) == 3 and s.epoch == 3 and s.position == 0
    assert [x.shape[0] for x, _ in WindowSampler(np.arange(201), 8, 7, 3).epoch_batches()] == [7, 7, 7, 4]

    in_order = WindowSampler(np.arange(201), 8, 7, 3, shuffle=False)
    assert starts(in_order.epoch_batches()) == list(range(25))


def test_next_batch_completes_a_batch_from_the_next_epoch():
    s = WindowSampler(np.arange(8 * 25 + 1), block_size=8, batch_size=10, seed=1)
    seen = starts(s.next_batch() for _ in range(5))  # 50 windows = 2 epochs exactly
    assert sorted(seen[:25]) == sorted(seen[25:]) == list(range(25))
    assert s.epoch == 2 and s.position == 0
    s = WindowSampler(np.arange(8 * 25 + 1), block_size=8, batch_size=10, seed=1)
    for _ in range(3):
        x, _ = s.next_batch()
        assert x.shape == (10, 8)
    assert s.epoch == 1 and s.position == 5


def test_resume_from_state_dict_gives_the_same_batches():
    tokens = np.arange(5000, dtype=np.uint16)
    a = WindowSampler(tokens, 32, 5, seed=7)
    for _ in range(40):  # past the first epoch (156 windows)
        a.next_batch()
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    b = WindowSampler(tokens, 32, 5, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(50):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="seed"):
        WindowSampler(tokens, 32, 5, seed=8).load_state_dict(state)


def test_eval_pass_is_fixed_and_leaves_training_alone():
    s = WindowSampler(np.arange(8 * 25 + 1), block_size=8, batch_size=10, seed=0)
    s.next_batch()
    before = s.state_dict()
    assert starts(s.iter_eval(None)) == list(range(25))
    assert starts(s.iter_eval(2)) == list(range(20)) == starts(s.iter_eval(2))
    assert s.state_dict() == before


def test_too_few_tokens_for_one_window():
    with pytest.raises(ValueError, match="10 tokens do not fill one window of block_size \\+ 1 = 11"):
        WindowSampler(np.arange(10), block_size=10, batch_size=1, seed=0)
    assert WindowSampler(np.arange(11), block_size=10, batch_size=1, seed=0).windows_per_epoch == 1


# --- prepare -------------------------------------------------------------------------------


def test_prepare_shakespeare_char(tmp_path, shakespeare):
    p = prepare_data(DataConfig(train=str(SHAKESPEARE)), TokenizerConfig(kind="char"), tmp_path, tmp_path / "cache", seed=0)
    assert (len(p.train), len(p.val), p.vocab_size) == (1_003_854, 111_540, 67)
    assert p.tokenizer.decode(p.val[:200].tolist()) == shakespeare[1_003_854:1_004_054]


def test_prepare_twice_neither_retrains_nor_retokenizes(tmp_path, monkeypatch):
    write(tmp_path / "a.txt", "the quick brown fox jumps over the lazy dog\n" * 50)
    write(tmp_path / "b.txt", "pack my box with five dozen liquor jugs\n" * 50)
    data, tok_cfg = DataConfig(train="*.txt"), TokenizerConfig(kind="bpe", vocab_size=300)
    first = prepare_data(data, tok_cfg, tmp_path, tmp_path / "cache", seed=0)
    assert first.vocab_size == 300 and first.train[-1] != eos_id(first.tokenizer)
    assert eos_id(first.tokenizer) in first.train.tolist()  # between a.txt and b.txt

    def fail(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(prepare_module, "build_tokenizer", fail)
    monkeypatch.setattr("stagewise.data.cache._write", fail)
    second = prepare_data(data, tok_cfg, tmp_path, tmp_path / "cache", seed=0)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)

    write(tmp_path / "b.txt", "something else entirely\n" * 50)
    monkeypatch.undo()
    assert prepare_data(data, tok_cfg, tmp_path, tmp_path / "cache", seed=0).fingerprint != first.fingerprint


def test_warm_start_opens_the_prepared_tokens_without_parsing(tmp_path, monkeypatch):
    from stagewise.config.data_config import DataConfig
    from stagewise.config.plan_config import TokenizerConfig

    (tmp_path / "a.txt").write_text("hello world\n" * 50, encoding="utf-8")
    cfg, tok = DataConfig(train="a.txt"), TokenizerConfig(kind="char")
    cold = prepare_data(cfg, tok, tmp_path, tmp_path / "cache", seed=0)

    def no_parsing(*args, **kwargs):
        raise AssertionError("the files were parsed again")

    monkeypatch.setattr(sources, "load_corpus", no_parsing)
    monkeypatch.setattr("stagewise.data.prepared_data.load_corpus", no_parsing)
    warm = prepare_data(cfg, tok, tmp_path, tmp_path / "cache", seed=0)
    assert warm.fingerprint == cold.fingerprint and warm.tokenizer.to_str() == cold.tokenizer.to_str()
    assert (warm.train == cold.train).all() and (warm.val == cold.val).all()
    (tmp_path / "a.txt").write_text("hello there\n" * 50, encoding="utf-8")  # new bytes: parsed again
    with pytest.raises(AssertionError, match="parsed again"):
        prepare_data(cfg, tok, tmp_path, tmp_path / "cache", seed=0)


def test_text_files_read_as_datasets_text_builder_reads_them(tmp_path: Path) -> None:
    """Text files are read directly (no datasets import at start-up), to the same documents as
    `load_dataset("text", sample_by="document")`: universal newlines, one document per file."""
    import tempfile

    import datasets

    (tmp_path / "a.txt").write_bytes(b"ROMEO:\r\nwhat light\rthrough\n\xc3\xa9\n")
    (tmp_path / "b.txt").write_bytes(b"second file\n\n")
    (tmp_path / "c.txt").write_text("held out\n", encoding="utf-8")
    corpus = listed(load_corpus(DataConfig(train=["a.txt", "b.txt"], val="c.txt"), tmp_path, seed=0))
    with tempfile.TemporaryDirectory() as scratch:
        ds = datasets.load_dataset("text", data_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                                   split="train", sample_by="document", cache_dir=scratch, keep_in_memory=True)
    assert corpus.train == ds["text"] == ["ROMEO:\nwhat light\nthrough\né\n", "second file\n\n"]
