"""ULMFiT from the building blocks: a causal LM pretrained on the SMS texts, a classification
head on its backbone, gradual unfreezing and discriminative LRs; it beats the majority class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED

from stagewise.config.plan_config import ModelConfig, TokenizerConfig
from stagewise.data.tokenizers import build_tokenizer, eos_id
from stagewise.models.build import build_model
from stagewise.models.heads import classifier_from_lm
from stagewise.optim.layers import discriminative_scales, layer_groups, set_trainable, unfrozen_count
from stagewise.tasks.batches import ExampleFiles, ExampleSampler
from stagewise.tasks.classify import classify_loss, evaluate_classify, majority_accuracy, prepare_classify
from stagewise.tasks.readers import read_labeled

SMS = SHARED / "sms_spam.tsv"


@pytest.mark.skipif(not SMS.exists(), reason="shared/data/sms_spam.tsv is not here")
def test_lm_backbone_classifier_with_gradual_unfreezing_beats_the_majority(tmp_path: Path) -> None:
    path = tmp_path / "sms.tsv"
    path.write_text("".join(SMS.read_text(encoding="utf-8").splitlines(keepends=True)[:1200]), encoding="utf-8")
    texts = [text for text, _ in read_labeled(path, 1, 0)]
    tok = build_tokenizer(TokenizerConfig(kind="char"), texts, tmp_path)
    eos = eos_id(tok)
    torch.manual_seed(0)
    lm = build_model(ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=48, n_positions=64),
                     tok.get_vocab_size(), eos, tmp_path)
    # LM pretraining on the texts: random 64-character windows of the whole stream.
    stream = torch.tensor([i for t in texts for i in [*tok.encode(t).ids, eos]])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, stream.numel() - 65, (16,), generator=gen)
        x = torch.stack([stream[s:s + 65] for s in starts.tolist()])
        loss = lm(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    data = prepare_classify(ExampleFiles(path, val_fraction=0.2, seed=0, max_len=64), 1, 0, tokenizer=tok, pad_id=eos)
    model, carried = classifier_from_lm(lm, len(data.label_map), eos, "stages[1]")
    assert carried == len(lm.transformer.state_dict())
    groups = layer_groups(model)
    scales = discriminative_scales(groups, 2.6)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam([{"params": [params[n]], "lr": 3e-3 * scales[n]} for g in groups for n in g])
    sampler = ExampleSampler(data.train, batch_size=32, seed=0)
    trained_per_epoch = []
    for epoch in range(len(groups)):
        trainable = {n for g in groups[len(groups) - unfrozen_count(len(groups), epoch):] for n in g}
        set_trainable(model, trainable)
        for _ in range(sampler.batches_per_epoch()):
            loss = classify_loss(model, sampler.next_batch())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        trained_per_epoch.append(sum(p.grad is not None for p in model.parameters()))
    assert trained_per_epoch == sorted(trained_per_epoch) and trained_per_epoch[0] < trained_per_epoch[-1]
    metrics = evaluate_classify(model, data.val, 128, torch.device("cpu"))
    assert metrics["val_accuracy"] > majority_accuracy(data) + 0.02, (metrics, majority_accuracy(data))
