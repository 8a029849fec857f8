"""Optimizers (hand-checked updates, parameter groups, Muon composite) and weight penalties."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from stagewise.config.optimizer_config import OPTIMIZER_SETTINGS
from stagewise.optim.optimizers import MuonWithAdamW, ProximalSGD, apply_settings, build_optimizer
from stagewise.optim.regularizers import weight_penalty


def settings(name: str, **overrides: object) -> dict:
    return {**OPTIMIZER_SETTINGS[name], "lr": 0.1, **overrides}


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def batch() -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def loss_of(model: nn.Module) -> torch.Tensor:
    return (model(batch()) - 0.5).pow(2).mean()


def gpt2(**overrides: object) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    # No dropout: runs that should match bit for bit must not draw random masks.
    config = AutoConfig.for_model("gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, **overrides)
    return AutoModelForCausalLM.from_config(config)


TOKENS = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))


def lm_loss(model: nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS, labels=TOKENS).loss


def groups_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["group"]: g for g in optimizer.param_groups}


def ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


def test_groups_split_weights_from_biases_and_norms() -> None:
    model = tiny()
    optimizer = build_optimizer("adamw", settings("adamw", weight_decay=0.05), model)
    groups = groups_by_name(optimizer)
    linear, norm = model[0], model[1]
    assert ids(groups["decay"]["params"]) == {id(linear.weight)}
    assert ids(groups["no_decay"]["params"]) == {id(linear.bias), id(norm.weight), id(norm.bias)}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr_scale"] == 1.0 for g in optimizer.param_groups)


def test_frozen_parameters_are_left_out() -> None:
    model = tiny()
    optimizer = build_optimizer("sgd", settings("sgd"), model, trainable={"0.weight", "0.bias"})
    assert ids([p for g in optimizer.param_groups for p in g["params"]]) == {id(model[0].weight), id(model[0].bias)}


@pytest.mark.parametrize("name", ["gd", "sgd"])
def test_sgd_is_torch_sgd_with_decay_on_weights_only(name: str) -> None:
    model = tiny()
    optimizer = build_optimizer(name, settings(name, momentum=0.9, nesterov=True, weight_decay=0.01), model)
    assert type(optimizer) is torch.optim.SGD
    groups = groups_by_name(optimizer)
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["momentum"] == 0.9 and groups["decay"]["nesterov"] is True


def test_adam_matches_the_textbook_update() -> None:
    model = tiny()
    lr, (b1, b2), eps = 0.1, (0.9, 0.999), 1e-8
    optimizer = build_optimizer("adam", settings("adam", lr=lr), model)
    params = list(model.parameters())
    expected = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 4):
        optimizer.zero_grad()
        loss_of(model).backward()
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            expected[i] = expected[i] - lr * m_hat / (v_hat.sqrt() + eps)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e)


def test_adamw_decays_weights_decoupled_and_not_biases() -> None:
    model = tiny()
    lr, wd, (b1, b2), eps = 0.1, 0.5, (0.9, 0.999), 1e-8
    optimizer = build_optimizer("adamw", settings("adamw", lr=lr, weight_decay=wd), model)
    weight, bias = model[0].weight, model[0].bias
    before = {p: p.detach().clone() for p in (weight, bias)}
    loss_of(model).backward()
    grads = {p: p.grad.clone() for p in (weight, bias)}
    optimizer.step()
    for p, decay in ((weight, wd), (bias, 0.0)):
        g = grads[p]
        m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
        # Decoupled: the decay shrinks the weights directly, outside the adaptive update.
        expected = before[p] * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected)


def test_proximal_sgd_without_l1_is_torch_sgd() -> None:
    ours_model, torch_model = tiny(), tiny()
    ours = build_optimizer("sgd_l1", settings("sgd_l1", momentum=0.9), ours_model)
    assert type(ours) is ProximalSGD
    theirs = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
            optimizer.zero_grad()
            loss_of(model).backward()
            optimizer.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sgd_l1_gives_exact_zeros_where_the_subgradient_does_not() -> None:
    # Least squares with 5 informative features out of 40.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 40, generator=gen)
    true_w = torch.zeros(40)
    true_w[:5] = torch.tensor([2.0, -1.5, 1.0, 3.0, -2.5])
    y = x @ true_w + 0.1 * torch.randn(200, generator=gen)
    strength = 0.1

    def train(name: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(40, 1, bias=False)
        optimizer = build_optimizer(name, settings(name, lr=0.05), model, l1=strength)
        for _ in range(300):
            optimizer.zero_grad()
            loss = (model(x).squeeze(1) - y).pow(2).mean() / 2
            if name == "sgd":  # the L1 term through its subgradient instead
                loss = loss + strength * model.weight.abs().sum()
            loss.backward()
            optimizer.step()
        return model.weight.detach().squeeze(0)

    proximal, subgradient = train("sgd_l1"), train("sgd")
    assert (proximal[5:] == 0).float().mean() > 0.8
    assert (proximal[:5] != 0).all()
    assert (subgradient == 0).sum() == 0


def test_sgd_l1_leaves_biases_unshrunk() -> None:
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.bias.fill_(1e-3)
    optimizer = build_optimizer("sgd_l1", settings("sgd_l1", lr=1.0), model, l1=1.0)
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    optimizer.step()
    assert (model.weight == 0).all() and model.bias.item() == torch.tensor(1e-3).item()


def test_muon_groups_on_gpt2() -> None:
    model = gpt2()
    optimizer = build_optimizer("muon", settings("muon", lr=1e-2), model)
    assert isinstance(optimizer, torch.optim.Optimizer) and isinstance(optimizer, MuonWithAdamW)
    groups = groups_by_name(optimizer)
    assert set(groups) == {"muon", "decay", "no_decay"}
    hidden = {id(m.weight) for name, m in model.named_modules() if name.endswith(("c_attn", "c_proj", "c_fc"))}
    assert ids(groups["muon"]["params"]) == hidden and len(hidden) == 8
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    assert model.get_output_embeddings().weight is wte  # tied: must appear once, as an embedding
    assert ids(groups["decay"]["params"]) == {id(wte), id(wpe)}
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
    every = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(every) == len(ids(every)) == len(list(model.parameters()))
    assert groups["muon"]["adjust_lr_fn"] == "match_rms_adamw"
    assert groups["muon"]["momentum"] == 0.95 and groups["decay"]["betas"] == (0.9, 0.95)
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_muon_keeps_an_untied_head_out_of_muon() -> None:
    model = gpt2(tie_word_embeddings=False)
    groups = groups_by_name(build_optimizer("muon", settings("muon"), model))
    head = model.get_output_embeddings().weight
    assert id(head) in ids(groups["decay"]["params"]) and id(head) not in ids(groups["muon"]["params"])


def test_muon_lowers_the_loss() -> None:
    model = gpt2()
    optimizer = build_optimizer("muon", settings("muon", lr=1e-2), model)
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is not None for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        lm_loss(model).backward()
        optimizer.step()


def test_muon_state_dict_round_trips_bit_for_bit() -> None:
    model = gpt2()
    optimizer = build_optimizer("muon", settings("muon", lr=1e-2), model)
    _train(model, optimizer, 2)
    saved = io.BytesIO()  # through a checkpoint file, as a resume would
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)

    fresh_model = copy.deepcopy(model)
    fresh = build_optimizer("muon", settings("muon", lr=1e-2), fresh_model)
    fresh.load_state_dict(torch.load(saved))
    assert len(fresh.state) == len(optimizer.state) == len(list(model.parameters()))
    _train(model, optimizer, 1)
    _train(fresh_model, fresh, 1)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    # A deep copy (or a pickle) is a working optimizer of its own.
    twin_model, twin = copy.deepcopy((model, optimizer))  # together, so they share parameters
    _train(model, optimizer, 1)
    _train(twin_model, twin, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
    # The inner optimizers follow the loaded groups: an LR set on the outer one is used.
    for group in fresh.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in fresh_model.parameters()]
    _train(fresh_model, fresh, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh_model.parameters()))


def test_apply_settings_changes_hyperparameters_and_keeps_state() -> None:
    model = tiny()
    optimizer = build_optimizer("adamw", settings("adamw"), model)
    for _ in range(2):
        optimizer.zero_grad()
        loss_of(model).backward()
        optimizer.step()
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    apply_settings(optimizer, "adamw", settings("adamw", lr=5.0, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2))
    groups = groups_by_name(optimizer)
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 and g["lr"] == 0.1 for g in optimizer.param_groups)
    assert groups["decay"]["weight_decay"] == 0.2 and groups["no_decay"]["weight_decay"] == 0.0
    for p, saved in state.items():
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())


def test_apply_settings_to_muon_sends_each_setting_to_its_half() -> None:
    optimizer = build_optimizer("muon", settings("muon"), gpt2())
    apply_settings(optimizer, "muon", settings("muon", momentum=0.9, nesterov=False, eps=1e-6, weight_decay=0.0))
    groups = groups_by_name(optimizer)
    assert groups["muon"]["momentum"] == 0.9 and groups["muon"]["nesterov"] is False
    assert groups["muon"]["eps"] == 1e-7  # Muon's own Newton-Schulz eps, not AdamW's
    assert groups["decay"]["eps"] == 1e-6 and groups["muon"]["weight_decay"] == 0.0


def test_apply_settings_updates_sgd_l1_strength() -> None:
    optimizer = build_optimizer("sgd_l1", settings("sgd_l1"), tiny(), l1=0.1)
    apply_settings(optimizer, "sgd_l1", settings("sgd_l1", momentum=0.5), l1=0.3)
    groups = groups_by_name(optimizer)
    assert groups["decay"]["l1"] == 0.3 and groups["no_decay"]["l1"] == 0.0
    assert groups["decay"]["momentum"] == 0.5


def test_user_errors() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("lion", {}, tiny())
    with pytest.raises(ValueError, match="missing"):
        build_optimizer("adam", {"lr": 0.1}, tiny())
    with pytest.raises(ValueError, match="cannot apply"):
        apply_settings(build_optimizer("sgd", settings("sgd"), tiny()), "adam", settings("adam"))


def test_weight_penalty_by_hand() -> None:
    model = tiny()
    weight = model[0].weight
    penalty = weight_penalty(model, l1=0.01, l2=0.1)
    assert penalty is not None
    torch.testing.assert_close(penalty, 0.01 * weight.abs().sum() + 0.1 * weight.pow(2).sum())
    penalty.backward()
    torch.testing.assert_close(weight.grad, 0.01 * weight.sign() + 0.2 * weight.detach())
    assert model[0].bias.grad is None and model[1].weight.grad is None
    assert weight_penalty(model, 0.0, 0.0) is None


def test_weight_penalty_counts_tied_weights_once() -> None:
    model = gpt2()
    wte = model.transformer.wte.weight
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    assert sum(p is wte for p in matrices) == 1
    expected = sum(p.pow(2).sum() for p in matrices)
    torch.testing.assert_close(weight_penalty(model, 0.0, 1.0), expected)
