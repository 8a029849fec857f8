"""The sft task: the loss counts completion tokens only, and a small GPT fine-tuned on a slice
beats the unigram baseline of the completions."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from conftest import reversal_file
from test_tasks import char_tokenizer
from torch.nn import functional as F

from stagewise.config.plan_config import ModelConfig
from stagewise.models.build import build_model
from stagewise.tasks.batches import ExampleSampler
from stagewise.tasks.encode import IGNORE
from stagewise.tasks.sft import evaluate_sft, prepare_sft, sft_loss

TOK = char_tokenizer("abcdefghij")
EOS = TOK.token_to_id("<eos>")


def _gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=48, n_positions=16)
    return build_model(cfg, vocab_size=TOK.get_vocab_size(), eos_id=EOS, plan_dir=Path("."))


def test_sft_loss_is_the_mean_over_completion_tokens_only(tmp_path: Path) -> None:
    data = prepare_sft(reversal_file(tmp_path / "r.jsonl", 20), TOK, EOS, max_len=16, val_fraction=0.2)
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
    data = prepare_sft(reversal_file(tmp_path / "r.jsonl", 600), TOK, EOS, max_len=16, val_fraction=0.15)
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
