"""Memory savers for GPUs, checked on the CPU: activation checkpointing trains the same (loss and
gradients) while keeping less for the backward pass, SDPA gives eager attention's logits, `auto`
picks SDPA on CUDA, and Liger asked for where it cannot run is one line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_plan, write_plan
from torch.nn import functional as F

from stagewise.cli import main
from stagewise.config.plan_config import ModelConfig
from stagewise.errors import UserError
from stagewise.models.build import apply_liger, build_model, checkpoint_activations, set_attention
from stagewise.models.gpt import GPT

VOCAB = 40


def _builtin() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=32, n_positions=32, bias=False)


def _transformers(arch: str, **keys: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, **keys), vocab_size=VOCAB, eos_id=0, plan_dir=Path("."))


MODELS = {
    "gpt": _builtin,
    "gpt2": lambda: _transformers("gpt2", n_layer=3, n_head=2, n_embd=32, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0),
    "llama": lambda: _transformers("llama", num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                   hidden_size=32, intermediate_size=64, max_position_embeddings=32),
}


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes of the tensors autograd keeps for the backward pass."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, ids)
    return loss, saved


@pytest.mark.parametrize("name", list(MODELS))
def test_activation_checkpointing_same_loss_and_gradients_less_kept(name: str) -> None:
    plain = MODELS[name]().train()
    recomputed = copy.deepcopy(plain)
    checkpoint_activations(recomputed, name)
    ids = torch.randint(0, VOCAB, (4, 25), generator=torch.Generator().manual_seed(1))
    loss, kept = _saved_bytes(plain, ids)
    loss_ckpt, kept_ckpt = _saved_bytes(recomputed, ids)
    loss.backward()
    loss_ckpt.backward()
    assert torch.equal(loss, loss_ckpt)
    for (n, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7), n
    assert kept_ckpt < 0.6 * kept  # only each block's input is kept, not its activations


def test_activation_checkpointing_is_a_model_setting_outside_the_stage_key() -> None:
    cfg = ModelConfig(arch="gpt", n_layer=2)
    assert "activation_checkpointing" not in cfg.model_dump()  # existing plans dump (and hash) as before
    on = ModelConfig(arch="gpt", n_layer=2, activation_checkpointing=True)
    assert on.activation_checkpointing and on.size_keys() == {"n_layer": 2}
    with pytest.raises(UserError, match="does not support"):
        checkpoint_activations(torch.nn.Linear(2, 2), "linear")


@pytest.mark.parametrize("name", ["gpt", "gpt2", "llama"])
def test_sdpa_and_eager_attention_give_the_same_logits(name: str) -> None:
    model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.set_attn_implementation("eager")  # type: ignore[operator]
        eager = model(input_ids=ids, use_cache=False).logits
        model.set_attn_implementation("sdpa")  # type: ignore[operator]
        sdpa = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(eager, sdpa, atol=1e-5)


def test_auto_attention_is_sdpa_on_cuda_and_eager_when_compiled_on_cpu() -> None:
    model = MODELS["gpt2"]()
    model.set_attn_implementation("eager")  # type: ignore[operator]
    assert set_attention(model, "auto", compiled=False, device=torch.device("cuda")) == "sdpa"
    assert model.config._attn_implementation == "sdpa"  # type: ignore[union-attr]
    assert set_attention(model, "auto", compiled=True, device=torch.device("cpu")) == "eager"
    assert set_attention(model, "auto", compiled=False, device=torch.device("cpu")) == "eager"  # the model's own


def test_liger_off_cuda_is_one_line() -> None:
    with pytest.raises(UserError, match="Triton kernels for CUDA; this run is on cpu") as e:
        apply_liger(MODELS["llama"](), torch.device("cpu"))
    assert e.value.where == "model.liger"


def test_liger_asked_for_on_cpu_is_one_line_at_check(tmp_path: Path, corpus: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 2}], device="cpu")
    plan["model"] = {"arch": "llama", "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 32, "liger": True}
    path = write_plan(tmp_path, plan)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (f"error: {path}: model.liger: Liger's kernels are Triton kernels for CUDA; "
                                       "this run is on cpu\n")
