"""A classification head on a causal-LM backbone: weights carried by name, refusal when they do
not fit, padding read right, and an export that loads back with the Auto classes as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from stagewise.config.plan_config import ModelConfig
from stagewise.errors import UserError
from stagewise.models.build import build_model
from stagewise.models.heads import carry_weights, classifier_from_lm

EOS = 0


def _lm(n_embd: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=n_embd, n_positions=32)
    return build_model(cfg, vocab_size=50, eos_id=EOS, plan_dir=Path("."))


def test_backbone_weights_carry_and_the_head_is_new() -> None:
    lm = _lm()
    clf, carried = classifier_from_lm(lm, num_classes=3, pad_id=EOS, where="stages[1]")
    assert carried == len(lm.transformer.state_dict())
    for name, tensor in lm.transformer.state_dict().items():
        assert torch.equal(tensor, clf.transformer.state_dict()[name]), name
    assert clf.score.weight.shape == (3, 32)


def test_right_padding_does_not_change_the_logits() -> None:
    clf, _ = classifier_from_lm(_lm(), num_classes=2, pad_id=EOS, where="stages[1]")
    clf.eval()
    text = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, EOS, EOS], [8, 9, EOS, EOS, EOS]])
    mask = (padded != EOS).long()
    with torch.no_grad():
        alone = clf(input_ids=text).logits
        batch = clf(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-6)


def test_a_head_that_does_not_fit_the_parent_is_one_line() -> None:
    lm, other = _lm(n_embd=32), _lm(n_embd=16)
    clf, _ = classifier_from_lm(other, num_classes=2, pad_id=EOS, where="stages[1]")
    with pytest.raises(UserError, match=r"^stages\[1\]: the parent's weight '.*' has shape .*does not fit"):
        carry_weights(lm.transformer, clf.transformer, "stages[1]")
    with pytest.raises(UserError, match="no weight of the parent model fits"):
        carry_weights(torch.nn.Linear(2, 2), clf.transformer, "stages[1]")


def test_export_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    clf, _ = classifier_from_lm(_lm(), num_classes=2, pad_id=EOS, where="stages[1]")
    clf.eval()
    clf.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, EOS], [8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(clf(input_ids=ids).logits, loaded(input_ids=ids).logits)
