"""The classify task's data, batches, loss and metrics, trained for real on a slice of SMS spam."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED, fit

from stagewise.errors import UserError
from stagewise.models.bigru import BiGRUClassifier
from stagewise.tasks.batches import ExampleFiles, ExampleSampler
from stagewise.tasks.classify import classify_loss, evaluate_classify, majority_accuracy, prepare_classify

SMS = SHARED / "sms_spam.tsv"
needs_sms = pytest.mark.skipif(not SMS.exists(), reason="shared/data/sms_spam.tsv is not here")


@pytest.fixture(scope="module")
def sms_slice(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("sms") / "sms.tsv"
    path.write_text("".join(SMS.read_text(encoding="utf-8").splitlines(keepends=True)[:1500]), encoding="utf-8")
    return path


@needs_sms
def test_bigru_beats_the_majority_class(sms_slice):
    data = prepare_classify(ExampleFiles(sms_slice, val_fraction=0.2, seed=0), text_field=1, label_field=0, vocab_size=3000)
    assert data.label_map.labels == ("ham", "spam")
    torch.manual_seed(0)
    model = BiGRUClassifier(num_classes=2, vocab_size=data.tokenizer.get_vocab_size(), embed_dim=32,
                            hidden=32, dense=32)
    fit(model, ExampleSampler(data.train, batch_size=32, seed=0), classify_loss, epochs=2, lr=3e-3)
    metrics = evaluate_classify(model, data.val, 128, torch.device("cpu"))
    baseline = majority_accuracy(data)
    assert metrics["val_accuracy"] > baseline + 0.05, (metrics, baseline)
    assert metrics["val_macro_f1"] > 0.8  # the majority class scores below 0.5 here
    assert set(metrics) == {"val_loss", "val_accuracy", "val_macro_f1"}


def test_sampler_resumes_on_the_same_batches(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("".join(f"{'ab'[i % 2]}\tword{i} and more {i % 7}\n" for i in range(50)), encoding="utf-8")
    data = prepare_classify(ExampleFiles(path, val_fraction=0.2), text_field=1, label_field=0)
    one = ExampleSampler(data.train, batch_size=7, seed=3)
    for _ in range(8):  # past the end of the first epoch (40 examples)
        one.next_batch()
    other = ExampleSampler(data.train, batch_size=7, seed=3)
    other.load_state_dict(one.state_dict())
    for _ in range(10):
        for a, b in zip(one.next_batch(), other.next_batch(), strict=True):
            assert torch.equal(a, b)
    assert one.epoch == other.epoch == 3  # 18 batches of 6 per epoch: the third epoch ended with its last batch


def test_each_epoch_sees_every_example_once(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("".join(f"{'ab'[i % 2]}\tw{i}\n" for i in range(30)), encoding="utf-8")
    data = prepare_classify(ExampleFiles(path, val=path), text_field=1, label_field=0)
    sampler = ExampleSampler(data.train, batch_size=4, seed=0)
    seen = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(sampler.batches_per_epoch())])
    assert sorted(seen.tolist()) == sorted(data.train.input_ids[:, 0].tolist())


def test_a_validation_label_training_never_saw_names_its_row(tmp_path):
    train, val = tmp_path / "train.tsv", tmp_path / "val.tsv"
    train.write_text("ham\thello there\nspam\twin money\n", encoding="utf-8")
    val.write_text("ham\thi\neggs\tnot a label\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"val\.tsv:2: .*eggs"):
        prepare_classify(ExampleFiles(train, val=val), text_field=1, label_field=0)


def test_a_split_that_leaves_no_training_records_is_one_line(tmp_path):
    path = tmp_path / "one.tsv"
    path.write_text("ham\thello\n", encoding="utf-8")
    with pytest.raises(UserError, match="one.tsv: .*leaves none for training"):
        prepare_classify(ExampleFiles(path, val_fraction=0.5), text_field=1, label_field=0)
