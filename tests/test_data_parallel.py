"""Encoding across processes (data.num_proc): the token files and cache keys are those of one
process, byte for byte; the workers end with the preparation."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data import documents, encoding
from stagewise.data.prepared_data import prepare_data
from stagewise.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> list[encoding._Worker]:
    """Small pieces and batches, workers for any amount of text, and the workers started."""
    monkeypatch.setattr(documents, "PIECE_CHARS", 300)
    monkeypatch.setattr(encoding, "BATCH_CHARS", 5000)
    monkeypatch.setattr(encoding, "PARALLEL_MIN_CHARS", 0)
    started: list[encoding._Worker] = []

    class Counted(encoding._Worker):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            started.append(self)

    monkeypatch.setattr(encoding, "_Worker", Counted)
    return started


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_two_processes_write_the_token_files_of_one(tmp_path: Path, workers: list[encoding._Worker],
                                                   kind: str) -> None:
    code = "".join(p.read_text(encoding="utf-8") for p in sorted((STDLIB / "json").glob("*.py")))
    (tmp_path / "a.txt").write_text(code + "wörds ünïcode 中文\n" * 20, encoding="utf-8")  # ~45k characters
    (tmp_path / "b.txt").write_text("a short second document", encoding="utf-8")
    (tmp_path / "c.txt").write_text(code[:7000], encoding="utf-8")
    tok = TokenizerConfig(kind=kind, vocab_size=400 if kind == "bpe" else None)
    files = {}
    for num_proc in (1, 2, 3):
        cache = tmp_path / f"cache{num_proc}"
        data = DataConfig(train=["a.txt", "b.txt", "c.txt"], num_proc=num_proc)
        p = prepare_data(data, tok, tmp_path, cache, seed=0)
        files[num_proc] = {f.name: f.read_bytes() for f in sorted((cache / "tokens").iterdir())}
        assert set(files[num_proc]) == {f"{p.fingerprint}-{split}.{ext}" for split in ("train", "val")
                                        for ext in ("bin", "json")}  # the same keys
    assert files[1] == files[2] == files[3]
    assert len(workers) == 2 + 2 + 3 + 2  # train in 2 and 3 workers, val (two batches) in 2 each
    assert all(w.proc.returncode == 0 for w in workers)  # each ended at the end of its input


def test_a_worker_that_dies_is_one_line_and_no_entry(tmp_path: Path, workers: list[encoding._Worker],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("some words and more words\n" * 2000, encoding="utf-8")
    send = encoding._Worker.send

    def dies(self: encoding._Worker, batch: encoding.Batch) -> None:
        self.proc.kill()
        self.proc.wait()
        send(self, batch)

    monkeypatch.setattr(encoding._Worker, "send", dies)
    with pytest.raises(UserError) as caught:
        prepare_data(DataConfig(train="a.txt", num_proc=2), TokenizerConfig(kind="byte"), tmp_path,
                     tmp_path / "cache", seed=0)
    assert str(caught.value) == ("data.num_proc: a process encoding the data stopped (exit code -9; out of memory?): "
                                 "set data.num_proc lower")
    assert not list((tmp_path / "cache" / "tokens").glob("*.bin"))
    assert all(w.proc.returncode is not None for w in workers)


def test_num_proc_is_in_no_key(tmp_path: Path) -> None:
    assert DataConfig(train="a.txt", num_proc=4).model_dump() == DataConfig(train="a.txt").model_dump()
    assert encoding.processes(3) == 3 and encoding.processes("auto") >= 1
