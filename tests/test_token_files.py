"""Pre-tokenized data: nanoGPT's train.bin/val.bin, .npy arrays and folders of shards are read in
place, train exactly as the text they were made from, are content-addressed, and every problem is
one line naming the file; nanoGPT's meta.pkl is never unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_plan

from stagewise.cli import main
from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data.prepared_data import PreparedData, prepare_data
from stagewise.data.tokenizers import build_tokenizer, save_tokenizer
from stagewise.engine.verify import metrics_difference
from stagewise.errors import UserError

STAGES: list[dict[str, Any]] = [
    {"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 10, "eval": {"every": 5}},
]


def _char_ids(corpus: Path, tmp: Path) -> tuple[PreparedData, int]:
    """The corpus prepared with a char tokenizer, and the number of its characters (its vocabulary
    without end-of-text and unknown)."""
    p = prepare_data(DataConfig(train=str(corpus)), TokenizerConfig(kind="char"), Path("/"), tmp / "chars", seed=0)
    return p, p.tokenizer.get_vocab_size() - 2


def _ids_plan(train: str, vocab: int, val: str | None = None) -> dict[str, Any]:
    return {"tokenizer": {"kind": "ids", "vocab_size": vocab},
            "data": {"train": train, **({"val": val} if val else {"val_fraction": 0.1})}}


@pytest.mark.parametrize("layout", ["nanogpt-bin", "npy-shards"])
def test_token_files_train_exactly_as_the_text_they_were_made_from(tmp_path: Path, corpus: Path, layout: str) -> None:
    """nanoGPT's layout (train.bin, val.bin of uint16, a meta.pkl beside them) and a folder of .npy
    shards of the same ids: the same losses, bit for bit, as the char-level plan on the text (kind ids
    numbers its vocabulary as the char tokenizer does: the ids, then end-of-text and unknown)."""
    chars, vocab = _char_ids(corpus, tmp_path)
    _, text_run = run_plan(tmp_path, corpus, STAGES, "text", threads=1)
    data = tmp_path / "data"
    data.mkdir()
    if layout == "nanogpt-bin":
        np.asarray(chars.train, dtype=np.uint16).tofile(data / "train.bin")
        np.asarray(chars.val, dtype=np.uint16).tofile(data / "val.bin")
        marker = tmp_path / "unpickled"
        (data / "meta.pkl").write_bytes(pickle.dumps(_Trap(str(marker))))  # runs code if ever unpickled
        top = _ids_plan(str(data / "train.bin"), vocab, str(data / "val.bin"))
    else:
        for i, part in enumerate(np.array_split(np.asarray(chars.train, dtype=np.int32), 3)):
            np.save(data / f"train_{i:03d}.npy", part)
        (data / "val").mkdir()
        np.save(data / "val" / "000.npy", np.asarray(chars.val, dtype=np.int32))
        top = _ids_plan(str(data), vocab, str(data / "val"))
    prepared, run = run_plan(tmp_path, corpus, STAGES, "tokens", threads=1, **top)
    assert prepared.data is not None and len(prepared.data.train) == len(chars.train) and prepared.data.vocab_size == vocab + 2
    assert metrics_difference(text_run, run) is None
    if layout == "nanogpt-bin":
        assert not marker.exists()


class _Trap:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_token_files_are_content_addressed_and_split_by_val_fraction(tmp_path: Path) -> None:
    ids = np.arange(1000, dtype=np.uint16) % 50
    ids.tofile(tmp_path / "a.bin")
    cfg, tok = DataConfig(train=str(tmp_path / "a.bin")), TokenizerConfig(kind="ids", vocab_size=50)
    first = prepare_data(cfg, tok, Path("/"), tmp_path / "cache", seed=0)
    assert len(first.train) == 900 and first.val[np.arange(100)].tolist() == ids[900:].tolist()
    ids.tofile(tmp_path / "copy.bin")
    same = prepare_data(DataConfig(train=str(tmp_path / "copy.bin")), tok, Path("/"), tmp_path / "cache", seed=0)
    assert same.fingerprint == first.fingerprint
    ids[500] = 7
    ids.tofile(tmp_path / "a.bin")
    assert prepare_data(cfg, tok, Path("/"), tmp_path / "cache", seed=0).fingerprint != first.fingerprint
    assert first.tokenizer.decode([3, 4, 50]) == "3 4"  # ids read as numbers; end-of-text is special


def test_a_tokenizer_file_names_the_tokenizer_that_made_the_ids(tmp_path: Path) -> None:
    byte = build_tokenizer(TokenizerConfig(kind="byte"), [], Path("/"))
    path = save_tokenizer(byte, tmp_path / "tok")
    np.asarray(byte.encode("hello token files " * 20).ids, dtype=np.uint16).tofile(tmp_path / "train.bin")
    p = prepare_data(DataConfig(train=str(tmp_path / "train.bin")), TokenizerConfig(kind="pretrained", path=str(path)),
                     Path("/"), tmp_path / "cache", seed=0)
    assert p.vocab_size == 257 and p.tokenizer.decode(p.train[np.arange(18)].tolist()) == "hello token files "


def _error(tmp_path: Path, data: dict[str, Any], tok: dict[str, Any] | None = None) -> str:
    with pytest.raises(UserError) as caught:
        prepare_data(DataConfig(**data), TokenizerConfig(**(tok or {"kind": "ids", "vocab_size": 50})),
                     tmp_path, tmp_path / "cache", seed=0)
    return str(caught.value)


def test_bad_token_files_are_one_line_naming_the_file(tmp_path: Path) -> None:
    (np.arange(300, dtype=np.uint16) % 50).tofile(tmp_path / "ok.bin")
    bad = np.arange(300, dtype=np.uint16) % 50
    bad[123] = 50
    bad.tofile(tmp_path / "big.bin")
    assert _error(tmp_path, {"train": "big.bin"}) == (
        f"data.train: {tmp_path / 'big.bin'}: id 50 at position 123 is outside the vocabulary (0..49): set the "
        "tokenizer that made the ids, or its vocab_size")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    assert _error(tmp_path, {"train": "odd.bin"}).endswith(
        "odd.bin: 3 bytes: not a whole number of uint16 ids (2 bytes each); set data.dtype to the type the file "
        "was written with")
    (tmp_path / "empty.bin").write_bytes(b"")
    assert _error(tmp_path, {"train": "empty.bin"}).endswith("empty.bin: empty file")
    np.save(tmp_path / "objects.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
    assert "objects.npy: cannot read as .npy: " in _error(tmp_path, {"train": "objects.npy"})
    np.save(tmp_path / "floats.npy", np.ones(10))
    assert _error(tmp_path, {"train": "floats.npy"}).endswith(
        "floats.npy: a 1-D array of float64: token files hold a 1-D array of integer ids")
    np.save(tmp_path / "signed.npy", np.array([1, -2, 3], dtype=np.int16))
    assert "signed.npy: id -2 at position 1 is outside the vocabulary" in _error(tmp_path, {"train": "signed.npy"})
    (tmp_path / "shards").mkdir()
    assert _error(tmp_path, {"train": "shards", "format": "tokens"}).endswith("no .bin or .npy file in the folder "
                                                                              f"'{tmp_path / 'shards'}'")
    assert _error(tmp_path, {"train": "ok.bin"}, {"kind": "char"}).startswith(
        "tokenizer.kind: 'char' is learnt from text, and the data is token files")
    (tmp_path / "a.txt").write_text("text")
    assert _error(tmp_path, {"train": ["a.txt", "ok.bin"]}).endswith(
        "ok.bin: token files (.bin, .npy) and text cannot be mixed in one split")


def test_check_on_a_nanogpt_plan_is_one_line_for_a_bad_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_plan, write_plan

    ids = np.arange(2000, dtype=np.uint16) % 60
    ids[1500] = 65
    ids.tofile(tmp_path / "train.bin")
    plan = tiny_plan(tmp_path / "train.bin", STAGES, **_ids_plan("train.bin", 60))
    path = write_plan(tmp_path, plan)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "train.bin: id 65 at position 1500" in err
    assert os.path.exists(tmp_path / "train.bin")
