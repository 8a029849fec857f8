"""Preparation of large corpora: text read and encoded in bounded pieces, to the same ids as the
whole text; memory flat in the corpus size; a killed preparation leaves no cache entry; input
past the stated bounds is one line naming the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import tiny_plan, write_plan

from stagewise.cli import main
from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data import cache, documents, encoding, prepared_data, tables
from stagewise.data.cache import open_token_array, splits_cleanly
from stagewise.data.documents import Documents, TextFile, cut
from stagewise.data.prepared_data import prepare_data
from stagewise.data.tokenizers import build_tokenizer, eos_id
from stagewise.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces, reads and batches a few hundred characters long, so that small files cross many."""
    monkeypatch.setattr(documents, "PIECE_CHARS", 300)
    monkeypatch.setattr(documents, "READ_BYTES", 1000)
    monkeypatch.setattr(encoding, "BATCH_CHARS", 2000)


def stdlib_text() -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted((STDLIB / "json").glob("*.py")))


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_pieces_encode_to_the_ids_of_the_whole_text(tmp_path: Path, small_pieces: None, kind: str) -> None:
    text = stdlib_text() + "\r\nCRLF line\r\nand a lone\rreturn\n" + "wörds ünïcode 中文\n" * 50
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    (tmp_path / "b.txt").write_text("the second document, short", encoding="utf-8")
    whole = [text.replace("\r\n", "\n").replace("\r", "\n"), "the second document, short"]
    cfg = TokenizerConfig(kind=kind, vocab_size=400 if kind == "bpe" else None)
    p = prepare_data(DataConfig(train=["a.txt", "b.txt"], val_fraction=0.1), cfg, tmp_path, tmp_path / "cache", seed=0)
    # What the preparation did before it streamed: the whole documents, split at 90% of the characters.
    at = int(sum(map(len, whole)) * 0.9)
    assert at < len(whole[0])
    train_docs, val_docs = [whole[0][:at]], [whole[0][at:], whole[1]]
    tok = build_tokenizer(cfg, train_docs, tmp_path)
    assert p.tokenizer.to_str() == tok.to_str()  # a BPE learns the same merges from the pieces
    eos = eos_id(tok)
    for docs, got in ((train_docs, p.train), (val_docs, p.val)):
        expected: list[int] = []
        for i, doc in enumerate(docs):
            expected += ([eos] if i else []) + tok.encode(doc, add_special_tokens=False).ids
        assert got.tolist() == expected


def test_pieces_are_bounded_and_cut_only_between_words_or_lines(small_pieces: None) -> None:
    text = stdlib_text()
    pieces = list(cut(iter([text[i:i + 777] for i in range(0, len(text), 777)]), "x"))
    assert "".join(pieces) == text and len(pieces) > 50
    assert max(map(len, pieces)) <= documents.PIECE_CHARS
    for before, after in zip(pieces, pieces[1:], strict=False):
        assert (after[0] == " " and before[-1].isascii() and before[-1].strip() and after[1].isascii()
                and after[1].isalpha()) or (before[-1] == "\n" and before[-2].strip() and after[0].strip()) or (
                before[-1].isascii() and before[-1].isalpha() and after[0].isascii() and not after[0].isalnum()
                and after[0].strip())


def test_a_sentencepiece_style_tokenizer_gets_whole_documents(tmp_path: Path, small_pieces: None) -> None:
    """A tokenizer that marks the start of every text (here: a normalizer prepending a space)
    would give other ids at a piece's start: it is given each document whole."""
    from tokenizers import Tokenizer, models, normalizers

    tok = build_tokenizer(TokenizerConfig(kind="char"), [stdlib_text() + "▁"], tmp_path)
    assert splits_cleanly(tok)
    marked = Tokenizer.from_str(tok.to_str())
    marked.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    assert isinstance(marked.model, models.BPE) and not splits_cleanly(marked)
    text = stdlib_text()
    ids = cache.token_array(Documents.of([text]), marked, tmp_path, "k").tolist()
    assert ids == marked.encode(text, add_special_tokens=False).ids


def test_bpe_learns_from_an_even_sample_named_in_its_file(tmp_path: Path, small_pieces: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(f"part{i:03d} " + "word " * 60 + "\n" for i in range(400))  # ~26k characters
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    docs = Documents((TextFile(tmp_path / "big.txt", 0, len(text)),))
    drawn = list(docs.sample(3000))
    assert 1500 <= sum(map(len, drawn)) <= 3000 + documents.PIECE_CHARS
    starts = [int(t.split("part")[1][:3]) for t in drawn if "part" in t]
    assert min(starts) < 40 and max(starts) > 360  # drawn over the whole text, not its start
    monkeypatch.setattr(prepared_data, "BPE_SAMPLE_CHARS", 3000)
    p = prepare_data(DataConfig(train="big.txt"), TokenizerConfig(kind="bpe", vocab_size=300), tmp_path,
                     tmp_path / "cache", seed=0)
    [saved] = (tmp_path / "cache" / "tokenizers").iterdir()
    assert saved.name.endswith("-sample3000.json") and 257 < p.tokenizer.get_vocab_size() <= 300


def test_a_line_past_the_bound_is_one_line_naming_file_and_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28: a 1 GB one-line file made `check` run for minutes and grow past 1.8 GB. A stretch
    of text with no place to cut it is refused after MAX_STRETCH characters, in bounded memory."""
    long = tmp_path / "long.txt"
    long.write_text("short first line\n" + "x" * (documents.MAX_STRETCH * 3 // 2) + "\n", encoding="utf-8")
    plan = write_plan(tmp_path, tiny_plan(long, [{"name": "a", "steps": 2, "optimizer": {"name": "adamw", "lr": 1e-3}}]))
    assert main(["check", str(plan), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (
        f"error: {plan}: data.train: {long}:2: more than 256 Ki characters without a space between words or a "
        "line break (the most stagewise encodes at once): break the text into lines\n")


def test_a_table_past_the_bound_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "MAX_BYTES", 1000)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(100)), encoding="utf-8")
    with pytest.raises(UserError) as caught:
        prepare_data(DataConfig(train="t.jsonl"), TokenizerConfig(kind="char"), tmp_path, tmp_path / "c", seed=0)
    assert str(caught.value) == (f"data.train: {path}: 2 MiB: tables and parquet files are read whole, up to 0 MiB "
                                 "each; split it into several files (a glob reads them all) or give the text as a "
                                 ".txt file").replace("2 MiB", f"{path.stat().st_size / 2**20:.0f} MiB")



@pytest.mark.parametrize("task", ["classify", "seq2seq", "tag", "sft"])
def test_task_data_past_the_bound_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str) -> None:
    """Every task's reader (classification, seq2seq, tagging, SFT) holds its file in memory, up to
    the tables' bound: past it, one line naming the file."""
    from stagewise.tasks import readers

    rows = {"classify": ('{"text": "a fine text", "label": "x"}\n', "t.jsonl", lambda p: readers.read_labeled(p, "text", "label")),
            "seq2seq": ("a source\ta target\n", "t.tsv", lambda p: readers.read_pairs(p, 0, 1)),
            "tag": ("word\tNOUN\n\n", "t.conll", readers.read_conll),
            "sft": ('{"prompt": "a", "completion": "b"}\n', "t.jsonl", readers.read_prompt_completion)}
    row, name, read = rows[task]
    path = tmp_path / name
    path.write_text(row * 100, encoding="utf-8")
    assert len(read(path)) == 100
    monkeypatch.setattr(tables, "MAX_BYTES", 1000)
    with pytest.raises(UserError) as caught:
        read(path)
    assert str(caught.value).startswith(f"{path}: 0 MiB: tables and parquet files are read whole, up to 0 MiB each")


def test_a_hub_dataset_past_the_bound_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub dataset (here a local dataset folder, read by the same datasets.load_dataset call, no
    network) is held in memory: past the tables' bound, one line before its text is read."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(f'{{"text": "row {i} of the data set"}}\n' for i in range(1000)))
    cfg = DataConfig(train=f"hub:{folder}", val_fraction=0.1)
    p = prepare_data(cfg, TokenizerConfig(kind="char"), tmp_path, tmp_path / "c", seed=0)
    assert len(p.train) + len(p.val) > 20_000  # under the bound: read whole, as before
    monkeypatch.setattr(tables, "MAX_BYTES", 10_000)
    with pytest.raises(UserError) as caught:
        prepare_data(cfg, TokenizerConfig(kind="char"), tmp_path, tmp_path / "c2", seed=0)
    assert str(caught.value) == (f"data.train: hub:{folder}: 0 MiB in column 'text': hub and parquet data are read "
                                 "whole, up to 0 MiB; save the text as .txt files (read piece by piece)")


CHILD = """
import resource, sys
from pathlib import Path
from stagewise.data import documents, encoding
from stagewise.data.prepared_data import prepare_data
from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
documents.PIECE_CHARS, documents.READ_BYTES, encoding.BATCH_CHARS = 4096, 1 << 20, 1 << 16
corpus, cache_dir, headroom = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
warm = corpus.with_name("warm.txt")  # every code path (and the tokenizers' threads) started first
warm.write_text("warm up text\\n" * 1000)
prepare_data(DataConfig(train=str(warm)), TokenizerConfig(kind="byte"), Path("/"), cache_dir / "warm", seed=0)
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))
resource.setrlimit(resource.RLIMIT_DATA, (vm + headroom, resource.RLIM_INFINITY))
p = prepare_data(DataConfig(train=str(corpus)), TokenizerConfig(kind="byte"), Path("/"), cache_dir, seed=0)
print(len(p.train) + len(p.val))
"""


def test_preparation_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """A corpus larger than the memory the preparing process may still allocate (RLIMIT_DATA:
    its heap and private mappings, not the token file it maps) is prepared whole: the text is
    never held at once. Before streaming, the file alone (a 40 MB str) broke the limit."""
    headroom = 32 << 20
    corpus = tmp_path / "corpus.txt"
    text = stdlib_text()
    with corpus.open("w", encoding="utf-8") as f:  # 40 MB of the json package's code, one document
        for _ in range(40_000_000 // len(text) + 1):
            f.write(text)
    size = len(corpus.read_text(encoding="utf-8"))
    assert size > headroom
    out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(tmp_path / "cache"), str(headroom)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) == len(corpus.read_bytes())  # one id per byte, no eos in a one-document corpus


KILLED = """
import sys
from pathlib import Path
from stagewise.data import documents, encoding
from stagewise.data.prepared_data import prepare_data
from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
documents.PIECE_CHARS, encoding.BATCH_CHARS = 4096, 1 << 16
prepare_data(DataConfig(train=sys.argv[1]), TokenizerConfig(kind="byte"), Path("/"), Path(sys.argv[2]), seed=0)
"""


def test_a_killed_preparation_leaves_no_entry_and_the_next_one_is_whole(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(stdlib_text() * 60, encoding="utf-8")  # ~2.7 MB: seconds to encode
    tokens = tmp_path / "cache" / "tokens"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(corpus), str(tmp_path / "cache")],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".") and p.stat().st_size > 0 for p in tokens.glob(".*")) if tokens.is_dir() \
            else True:
        assert proc.poll() is None and time.monotonic() < deadline, "the preparation ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(tokens.glob("*.bin")) and not list(tokens.glob("*.json"))  # only the hidden temporary file
    assert not (tmp_path / "cache" / "prepared").exists()
    p = prepare_data(DataConfig(train=str(corpus)), TokenizerConfig(kind="byte"), Path("/"), tmp_path / "cache",
                     seed=0)
    assert open_token_array(tokens, f"{p.fingerprint}-train") is not None
    text = corpus.read_text(encoding="utf-8")
    at = int(len(text) * 0.9)
    assert p.train.tolist() == p.tokenizer.encode(text[:at], add_special_tokens=False).ids
    assert p.val.tolist() == p.tokenizer.encode(text[at:], add_special_tokens=False).ids


def test_each_file_is_scanned_once_before_it_is_encoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest that finds a prepared entry and the check and length of a text file come from one
    read of the file (there were two)."""
    from stagewise.data import sources

    scanned: list[Path] = []

    def counted(path: Path, *args: object) -> documents.Scan:
        scanned.append(path)
        return documents.scan_text(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sources, "scan_text", counted)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"the text of {name}\n" * 50, encoding="utf-8")
    data = DataConfig(train="a.txt", val="b.txt")
    cold = prepare_data(data, TokenizerConfig(kind="char"), tmp_path, tmp_path / "cache", seed=0)
    assert sorted(scanned) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    warm = prepare_data(data, TokenizerConfig(kind="char"), tmp_path, tmp_path / "cache", seed=0)
    assert len(scanned) == 4 and warm.fingerprint == cold.fingerprint
    (tmp_path / "b.txt").write_bytes(b"\xff")  # found by the same one read, and named as before
    with pytest.raises(UserError, match=r"^data\.val: .*b\.txt: not UTF-8: byte 0xff at offset 0"):
        prepare_data(data, TokenizerConfig(kind="char"), tmp_path, tmp_path / "cache", seed=0)
