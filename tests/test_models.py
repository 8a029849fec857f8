"""Models from transformers configs; per-stage dropout; sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagewise.config.plan_config import ModelConfig
from stagewise.errors import UserError
from stagewise.models.build import DropoutControl, build_model, context_length, set_attention
from stagewise.models.generate import sample


@pytest.mark.parametrize("arch,keys", [
    ("gpt2", {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 24, "resid_pdrop": 0.1}),
    ("llama", {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_size": 16,
               "intermediate_size": 32, "max_position_embeddings": 24, "attention_dropout": 0.1}),
])
def test_any_causal_lm_from_config_and_dropout_per_stage(arch: str, keys: dict, tmp_path: Path) -> None:
    model = build_model(ModelConfig(arch=arch, **keys), vocab_size=37, eos_id=36, plan_dir=tmp_path)
    assert model.get_input_embeddings().num_embeddings == 37
    assert context_length(model) == 24
    control = DropoutControl(model)
    assert control.rates() == {0.1}
    control.set(0.3)
    assert control.rates() == {0.3}
    control.set(None)  # a stage that sets none gets the model's own rate back
    assert control.rates() == {0.1}
    x = torch.randint(0, 37, (2, 8))
    model.train()
    control.set(0.0)
    a, b = model(input_ids=x).logits, model(input_ids=x).logits
    assert torch.equal(a, b)  # no dropout: deterministic in train mode
    control.set(0.5)
    assert not torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)


def test_unknown_size_key_and_small_vocab_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model.n_embed: not a config key of gpt2 \(did you mean 'n_embd'\?\)"):
        build_model(ModelConfig(arch="gpt2", n_embed=16), 10, 9, tmp_path)
    with pytest.raises(UserError, match="model.vocab_size: must be >= the tokenizer's 50"):
        build_model(ModelConfig(arch="gpt2", vocab_size=20), 50, 49, tmp_path)


def test_pretrained_directory_loads_and_missing_one_is_one_line(tmp_path: Path) -> None:
    model = build_model(ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=16, n_positions=16), 30, 29, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    again = build_model(ModelConfig(pretrained="saved"), 30, 29, tmp_path)
    x = torch.randint(0, 30, (1, 5))
    assert torch.equal(model.eval()(input_ids=x).logits, again.eval()(input_ids=x).logits)
    with pytest.raises(UserError, match="model.pretrained: cannot load 'missing-dir'"):
        build_model(ModelConfig(pretrained="missing-dir"), 30, 29, tmp_path)


def test_sample_crops_to_context_and_greedy_is_deterministic(tmp_path: Path) -> None:
    model = build_model(ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=16, n_positions=8), 20, 19, tmp_path)
    start = torch.tensor([[1, 2, 3]])
    out = sample(model, start, max_tokens=20, context=8, temperature=0.0)  # longer than the context
    assert out.shape == (1, 23) and torch.equal(out[:, :3], start)
    assert torch.equal(out, sample(model, start, max_tokens=20, context=8, temperature=0.0))
    g = torch.Generator().manual_seed(0)
    topk = sample(model, start, max_tokens=10, context=8, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(topk, out[:, :13])  # top-1 sampling is greedy


def test_auto_attention_is_eager_when_compiling_on_cpu(tmp_path: Path) -> None:
    def built() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=16, n_positions=16), 30, 29, tmp_path)

    cpu = torch.device("cpu")
    plain, compiled = built(), built()
    assert set_attention(plain, "auto", compiled=False, device=cpu) == "sdpa"
    assert set_attention(compiled, "auto", compiled=True, device=cpu) == "eager"
    assert compiled.config._attn_implementation == "eager"
    x = torch.randint(0, 30, (2, 9))  # the same function either way: only the kernel differs
    torch.testing.assert_close(plain.eval()(input_ids=x).logits, compiled.eval()(input_ids=x).logits)
    assert set_attention(plain, "eager", compiled=False, device=cpu) == "eager"


def test_cached_sampling_equals_recomputing_every_window(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=16, n_positions=12), 20, 19, tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # nanoGPT's loop: the last `context` tokens, recomputed for every token
        for _ in range(25):
            nxt = model.eval()(input_ids=ids[:, -12:], use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(sample(model, torch.tensor([[1, 2, 3]]), max_tokens=25, context=12, temperature=0.0), ids)
