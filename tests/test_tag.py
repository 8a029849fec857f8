"""The tag task with the BiGRU tagger: span F1 on held-out sentences well above the trivial
all-O tagger, context decides ambiguous words, and an unseen validation tag names its line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import conll_file, fit

from stagewise.errors import UserError
from stagewise.models.bigru import BiGRUTagger
from stagewise.tasks.batches import ExampleFiles, ExampleSampler
from stagewise.tasks.metrics import span_f1
from stagewise.tasks.tag import evaluate_tag, prepare_tag, tag_loss


def test_bigru_tagger_finds_spans_by_context(tmp_path: Path) -> None:
    data = prepare_tag(ExampleFiles(conll_file(tmp_path / "train.conll", 400, 0), val=conll_file(tmp_path / "val.conll", 80, 1)))
    gold = [[data.tag_map.decode(t) for t in row[row != -100].tolist()] for row in data.val.tags]
    assert span_f1([["O"] * len(g) for g in gold], gold) == 0.0  # the trivial tagger
    torch.manual_seed(0)
    model = BiGRUTagger(num_tags=len(data.tag_map), vocab_size=data.vocab.get_vocab_size(), embed_dim=16, hidden=16)
    fit(model, ExampleSampler(data.train, batch_size=16, seed=0), tag_loss, epochs=8, lr=1e-2)
    metrics = evaluate_tag(model, data, 64, torch.device("cpu"))
    assert metrics["val_span_f1"] > 0.9, metrics


def test_a_validation_tag_training_never_saw_names_its_line(tmp_path: Path) -> None:
    train, val = tmp_path / "train.conll", tmp_path / "val.conll"
    train.write_text("Bob B-PER\nran O\n", encoding="utf-8")
    val.write_text("Bob B-PER\n\nin O\nRome B-LOC\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"val\.conll:4: .*B-LOC"):
        prepare_tag(ExampleFiles(train, val=val))
