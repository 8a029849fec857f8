"""The sft task: the loss counts completion tokens only, and a small GPT fine-tuned on a slice
beats the unigram baseline of the completions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import reversal_file
from test_tasks import char_tokenizer
from torch.nn import functional as F

from stagewise.config.plan_config import ModelConfig
from stagewise.models.build import build_model
from stagewise.models.gpt import GPT
from stagewise.tasks.batches import ExampleFiles, ExampleSampler
from stagewise.tasks.encode import IGNORE
from stagewise.tasks.sft import evaluate_sft, prepare_sft, sft_loss

TOK = char_tokenizer("abcdefghij")
EOS = TOK.token_to_id("<eos>")


def _gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=48, n_positions=16)
    return build_model(cfg, vocab_size=TOK.get_vocab_size(), eos_id=EOS, plan_dir=Path("."))


def test_sft_loss_is_the_mean_over_completion_tokens_only(tmp_path: Path) -> None:
    data = prepare_sft(ExampleFiles(reversal_file(tmp_path / "r.jsonl", 20), val_fraction=0.2, max_len=16), TOK, EOS)
    model = _gpt().eval()
    input_ids, labels = data.train.rows(torch.arange(6))
    logits = model(input_ids=input_ids).logits.float()
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1),
                                reduction="none").view(input_ids.size(0), -1)
    completion = labels[:, 1:] != IGNORE
    by_hand = per_token[completion].mean()
    assert torch.allclose(sft_loss(model, (input_ids, labels)), by_hand)
    assert not torch.allclose(per_token.mean(), by_hand)  # the prompt positions would change it
    # Every prompt token is masked: an example's first completion label follows its last prompt token.
    first = labels[0].ne(IGNORE).nonzero()[0].item()
    assert first > 0 and (labels[0, :first] == IGNORE).all()


def test_sft_beats_the_unigram_baseline(tmp_path: Path) -> None:
    data = prepare_sft(ExampleFiles(reversal_file(tmp_path / "r.jsonl", 600), val_fraction=0.15, max_len=16), TOK, EOS)
    targets = data.train.labels[data.train.labels != IGNORE]
    probs = torch.bincount(targets, minlength=TOK.get_vocab_size()).float() / targets.numel()
    val_targets = data.val.labels[data.val.labels != IGNORE]
    unigram = float(-(probs[val_targets].clamp_min(1e-9).log()).mean())
    model = _gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = ExampleSampler(data.train, batch_size=32, seed=0)
    for _ in range(250):
        loss = sft_loss(model, sampler.next_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = evaluate_sft(model, data.val, 64, torch.device("cpu"))
    assert metrics["val_loss"] < 0.6 * unigram, (metrics, unigram)
    assert metrics["val_ppl"] == math.exp(metrics["val_loss"])


def _packing_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    vocab = TOK.get_vocab_size()
    llama = ModelConfig(arch="llama", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=32,
                        intermediate_size=64, max_position_embeddings=32)
    return {"gpt": GPT(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, n_positions=32, bias=False),
            "gpt2": build_model(ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=32), vocab, EOS,
                                Path(".")),
            "llama": build_model(llama, vocab, EOS, Path("."))}


def _token_losses(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Each completion token's loss, in the order of the examples (packed or not, rows hold them in order)."""
    input_ids, labels, *packed = batch
    logits = model(input_ids=input_ids, use_cache=False, **({"position_ids": packed[0]} if packed else {})).logits
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    return losses[labels[:, 1:] != IGNORE]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_loss(tmp_path: Path, attention: str) -> None:
    """Position ids restart with each example and attention stays within it: every completion
    token's loss in a packed batch is its loss unpacked (so is sft_loss, their mean); without the
    position ids (plain packing) it is not."""
    path = reversal_file(tmp_path / "r.jsonl", 40)
    packed = prepare_sft(ExampleFiles(path, val_fraction=0.1, max_len=32), TOK, EOS, pack=True).train
    unpacked = prepare_sft(ExampleFiles(path, val_fraction=0.1, max_len=32), TOK, EOS).train
    assert len(packed) < len(unpacked) // 2 and packed.position_ids is not None
    for name, model in _packing_models().items():
        model.eval().set_attn_implementation(attention)
        with torch.no_grad():
            rows, alone = packed.rows(torch.arange(len(packed))), unpacked.rows(torch.arange(len(unpacked)))
            each, each_alone, across = (_token_losses(model, b) for b in (rows, alone, rows[:2]))
            assert torch.allclose(sft_loss(model, rows), sft_loss(model, alone), rtol=1e-6), name
        assert torch.allclose(each, each_alone, atol=1e-5), name
        assert not torch.allclose(across, each_alone, atol=1e-4), name  # examples saw the ones before them
