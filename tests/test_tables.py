"""data.tables: one reader of table rows, for causal-LM stages (data.sources) and task stages
(tasks.readers). Both must see the same rows, so that they hold out the same ones."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_plan, write_plan

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.data.prepared_data import prepare_data
from stagewise.data.sources import load_corpus
from stagewise.errors import UserError
from stagewise.plan.load import load_plan
from stagewise.tasks.batches import split_records
from stagewise.tasks.readers import read_labeled


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def lm_documents(path: Path, field: str | int, seed: int = 0, **cfg: Any) -> tuple[list[str], list[str]]:
    """(train, val) documents of a causal-LM stage reading `field` of `path`."""
    c = load_corpus(DataConfig(train=path.name, field=field, **cfg), path.parent, seed=seed,
                    cache_dir=path.parent / "hf")
    return list(c.train.documents()), list(c.val.documents())


def test_a_stray_quote_in_a_headed_tsv_is_text_for_every_stage(tmp_path):
    """The `datasets` CSV parser took the `"` as an opening quote and joined the rows after it
    into one; a TSV has no quoting, so every line is a row, for both kinds of stage."""
    path = write(tmp_path / "sms.tsv", 'label\ttext\nham\tok then\nspam\t"WIN now\nham\tsee you\nham\tbye\n')
    records = read_labeled(path, "text", "label")
    assert records == [("ok then", "ham"), ('"WIN now', "spam"), ("see you", "ham"), ("bye", "ham")]
    assert records.lines == [2, 3, 4, 5]
    train, _ = lm_documents(path, "text", val=path.name)
    assert train == [text for text, _ in records]


def _rows(rng: random.Random, n: int, line_breaks: bool) -> list[tuple[str, str]]:
    """(text, label) rows with the characters parsers disagree on: quotes (balanced or not),
    commas, \\x0b and U+2028 (line breaks to str.splitlines, not to a table), and, where the
    format can hold them, line breaks in a cell."""
    pieces = ["word", '"', "'", ",", ";", " ", "\x0b", "\u2028", "caf\u00e9", '"quoted"', *(["\n"] * line_breaks)]
    rows = []
    for i in range(n):
        parts = [rng.choice(pieces) for _ in range(rng.randint(1, 8))]
        parts.insert(rng.randint(0, len(parts)), f"m{i}")  # a cell may start with a quote
        rows.append(("".join(parts), rng.choice(["ham", "spam"])))
    return rows


def _table(fmt: str, rows: list[tuple[str, str]], rng: random.Random) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["label", "text"])
        writer.writerows((label, text) for text, label in rows)
        return out.getvalue()
    if fmt == "json":
        return json.dumps([{"text": text, "label": label} for text, label in rows], indent=2)
    lines = {"tsv": [f"{label}\t{text}" for text, label in rows],
             "headed.tsv": ["label\ttext", *(f"{label}\t{text}" for text, label in rows)],
             "jsonl": [json.dumps({"label": label, "text": text}) for text, label in rows]}[fmt]
    return "".join(line + "\n" + ("\n" if rng.random() < 0.1 else "") for line in lines)  # blank lines too


@pytest.mark.parametrize("fmt", ["tsv", "headed.tsv", "csv", "jsonl", "json"])
@pytest.mark.parametrize("seed", [0, 5])
def test_both_paths_hold_out_identical_rows_of_a_generated_table(tmp_path, fmt, seed):
    rng = random.Random(f"{fmt}{seed}")
    rows = _rows(rng, 60, line_breaks=fmt in ("csv", "jsonl", "json"))
    path = write(tmp_path / f"t.{fmt}", _table(fmt, rows, rng))
    text_field, label_field = (1, 0) if fmt == "tsv" else ("text", "label")
    records = read_labeled(path, text_field, label_field)
    assert records == rows  # each reader reads the table right, not merely like the other
    task_train, task_val = split_records(records, 0.2, seed)
    lm_train, lm_val = lm_documents(path, text_field, seed=seed, val_fraction=0.2)
    assert lm_val == [text for text, _ in task_val] and len(lm_val) == 12
    assert lm_train == [text for text, _ in task_train]


def test_a_json_array_of_objects_gives_its_objects_with_their_lines(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"text": "one", "label": "a"},\n\n  {"label": "b",\n   "text": "two"}\n]\n')
    records = read_labeled(path, "text", "label")
    assert records == [("one", "a"), ("two", "b")] and records.lines == [2, 4]
    assert lm_documents(path, "text", val=path.name)[0] == ["one", "two"]
    # One line holding an array that is not all objects is JSON Lines: a row that is an array.
    mixed = write(tmp_path / "m.json", '[{"text": "one", "label": "a"}, 3]\n')
    with pytest.raises(UserError, match=r"m.json:1: expected a JSON object, got an array$"):
        read_labeled(mixed, "text", "label")


def test_a_negative_column_index_is_refused_by_the_plan_and_by_the_reader(tmp_path, corpus):
    path = write(tmp_path / "d.tsv", "ham\tok\n")
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 2}])
    plan["data"]["field"] = -1
    with pytest.raises(UserError) as caught:
        load_plan(write_plan(tmp_path, plan))
    assert str(caught.value).endswith("plan.yaml: data.field: input should be greater than or equal to 0 (got -1)"), caught.value
    with pytest.raises(UserError, match=r"d.tsv: column indices start at 0, got -1$"):
        read_labeled(path, -1, 0)  # the reader, called from code


def test_tables_and_warm_starts_never_import_datasets(tmp_path):
    """`datasets` takes seconds to import: reading a table (either path) and a warm start of any
    corpus must not pay for it. A cold start of a text file may: it is parsed by `datasets`."""
    write(tmp_path / "a.txt", "hello world\n" * 50)
    write(tmp_path / "t.tsv", "".join(f"ham\tmessage {i}\n" for i in range(20)))
    cfg, tok = DataConfig(train="a.txt"), TokenizerConfig(kind="char")
    cold = prepare_data(cfg, tok, tmp_path, tmp_path / "cache", seed=0)
    script = f"""
import sys
from pathlib import Path
from stagewise.data.prepared_data import prepare_data
from stagewise.data.sources import load_corpus
from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
from stagewise.tasks.readers import read_labeled
d = Path({str(tmp_path)!r})
warm = prepare_data(DataConfig(train="a.txt"), TokenizerConfig(kind="char"), d, d / "cache", seed=0)
table = load_corpus(DataConfig(train="t.tsv", field=1), d, seed=0)
records = read_labeled(d / "t.tsv", 1, 0)
print(warm.fingerprint, len(table.train) + len(table.val), len(records), "datasets" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [cold.fingerprint, "20", "20", "False"]
