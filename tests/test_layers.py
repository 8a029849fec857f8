"""Layer groups, freezing by pattern, gradual unfreezing and discriminative LRs, on real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagewise.config.plan_config import ModelConfig
from stagewise.errors import UserError
from stagewise.models.bigru import BiGRUClassifier
from stagewise.models.build import build_model
from stagewise.optim.layers import discriminative_scales, layer_groups, matching, set_trainable, unfrozen_count


def _gpt2() -> torch.nn.Module:
    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=16, n_positions=16)
    return build_model(cfg, vocab_size=40, eos_id=0, plan_dir=Path("."))


def test_transformer_groups_are_embeddings_blocks_then_head() -> None:
    groups = layer_groups(_gpt2())
    assert [sorted({n.split(".")[1] if n.startswith("transformer.h") else n.split(".")[1] for n in g})
            for g in groups] == [["wpe", "wte"], ["h"], ["h"], ["ln_f"]]
    assert all(n.startswith("transformer.h.0.") for n in groups[1])
    assert all(n.startswith("transformer.h.1.") for n in groups[2])


def test_gradual_unfreezing_adds_one_group_of_gradients_per_epoch() -> None:
    torch.manual_seed(0)
    model = BiGRUClassifier(num_classes=2, vocab_size=30, embed_dim=8, hidden=8, dense=8)
    groups = layer_groups(model)
    assert [g[0].split(".")[0] for g in groups] == ["embed", "gru", "dense", "out"]
    ids = torch.randint(2, 30, (4, 6))
    labels = torch.tensor([0, 1, 0, 1])
    seen = []
    for epoch in range(5):
        trainable = {n for g in groups[len(groups) - unfrozen_count(len(groups), epoch):] for n in g}
        set_trainable(model, trainable)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(ids), labels).backward()
        seen.append(sorted({n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}))
    assert seen == [["out"], ["dense", "out"], ["dense", "gru", "out"], ["dense", "embed", "gru", "out"],
                    ["dense", "embed", "gru", "out"]]


def test_discriminative_scales_divide_by_the_factor_per_group_down() -> None:
    groups = layer_groups(_gpt2())
    scales = discriminative_scales(groups, 2.6)
    assert [scales[g[0]] for g in groups] == pytest.approx([2.6 ** -3, 2.6 ** -2, 2.6 ** -1, 1.0])


def test_freeze_patterns_match_names_and_a_typo_is_one_line() -> None:
    model = _gpt2()
    assert matching(model, ["transformer.h.0.*"], "stages[1].freeze") == set(layer_groups(model)[1])
    with pytest.raises(UserError, match=r"^stages\[1\]\.freeze\[1\]: 'transformer\.hh\.\*' matches no parameter"):
        matching(model, ["transformer.wte.*", "transformer.hh.*"], "stages[1].freeze")
