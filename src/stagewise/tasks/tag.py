"""The `tag` task: CoNLL-style files -> word ids and tag ids -> per-word cross-entropy, and
val_loss / val_span_f1 (exact typed spans, conlleval's rules: metrics.span_scores).

The model maps (input_ids, attention_mask) to (B, T, tags) logits: models.bigru.BiGRUTagger, or
a transformers token-classification model (e.g. bert) built from config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import ModelConfig
from stagewise.config.stage_config import StageConfig
from stagewise.tasks.base import Batch, ExampleTask, Task
from stagewise.tasks.batches import ExampleFiles
from stagewise.tasks.classify import logits_of
from stagewise.tasks.encode import IGNORE, encode_tagging, targets
from stagewise.tasks.export import TrainedStage, auto_tokenizer, load_transformers, save_builtin, save_transformers
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.metrics import span_f1
from stagewise.tasks.models import check_arch, from_config, root_model
from stagewise.tasks.readers import read_conll
from stagewise.tasks.spec import GenerateOptions, StageInput, StageSetup, TaskSpec
from stagewise.tasks.traits import TaskTraits
from stagewise.tasks.vocab import PAD_ID, word_vocab

MAX_LEN = 128  # words per sentence when the data sets no max_len


@dataclass(frozen=True)
class TagRows:
    input_ids: torch.Tensor  # (N, T) PAD-padded word ids
    attention_mask: torch.Tensor  # (N, T)
    tags: torch.Tensor  # (N, T) tag ids, -100 on padding

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        return self.input_ids[index, :width], mask[:, :width], self.tags[index, :width]

@dataclass(frozen=True)
class TagData:
    vocab: Tokenizer
    tag_map: LabelMap  # from the training tags: a validation tag outside it is refused
    train: TagRows
    val: TagRows


def prepare_tag(files: ExampleFiles, *, vocab_size: int | None = None) -> TagData:
    train, val = files.split(read_conll)
    max_len = files.max_len or MAX_LEN
    vocab = word_vocab((words for words, _ in train), vocab_size)
    tag_map = LabelMap.from_labels((tag for _, tags in train for tag in tags), kind="tag")
    encoded = [TagRows(*encode_tagging(part, vocab, tag_map, max_len, PAD_ID)) for part in (train, val)]
    return TagData(vocab, tag_map, encoded[0], encoded[1])


def tag_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the words of the batch."""
    input_ids, mask, tags = batch
    return _word_loss(logits_of(model, input_ids, mask), tags)


def _word_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tags.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def evaluate_tag(model: nn.Module, data: TagData, batch_size: int, device: torch.device) -> dict[str, float]:
    """val_loss (word-weighted) and val_span_f1 over the whole validation set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predicted: list[list[str]] = []
    gold: list[list[str]] = []
    for start in range(0, len(data.val), batch_size):
        input_ids, mask, tags = (t.to(device) for t in data.val.rows(torch.arange(start, min(start + batch_size, len(data.val)))))
        n = int(mask.sum())
        logits = logits_of(model, input_ids, mask)  # (B, T, tags)
        total += _word_loss(logits, tags).item() * n
        count += n
        best = logits.argmax(dim=-1)
        for row_pred, row_gold, row_mask in zip(best.tolist(), tags.tolist(), mask.bool().tolist(), strict=True):
            predicted.append([data.tag_map.decode(p) for p, m in zip(row_pred, row_mask, strict=True) if m])
            gold.append([data.tag_map.decode(g) for g, m in zip(row_gold, row_mask, strict=True) if m])
    model.train(was_training)
    return {"val_loss": total / count, "val_span_f1": span_f1(predicted, gold)}


def most_frequent_tags(train: list[tuple[list[str], list[str]]], sentences: list[list[str]]) -> list[list[str]]:
    """The trivial baseline: each word's most frequent training tag ("O" for a word never seen)."""
    by_word: dict[str, Counter[str]] = {}
    for words, tags in train:
        for w, t in zip(words, tags, strict=True):
            by_word.setdefault(w, Counter())[t] += 1
    return [[by_word[w].most_common(1)[0][0] if w in by_word else "O" for w in words] for words in sentences]


class TagTask(ExampleTask):
    kind = "tag"

    def __init__(self, model: nn.Module, device: torch.device, autocast: Any, data: TagData) -> None:
        super().__init__(model, device, autocast, data.train, data.vocab.get_vocab_size())
        self.data = data

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        return tag_loss(self.model, batch)  # type: ignore[arg-type]

    def targets(self, batch: Batch) -> torch.Tensor:
        return targets(batch[2])  # the words' tags

    def metrics(self, batch_size: int) -> dict[str, float]:
        return evaluate_tag(self.model, self.data, batch_size, self.device)


class TagSpec(TaskSpec[TagData]):
    name = "tag"
    traits = TaskTraits(family="tag", metrics=("val_loss", "train_loss", "val_span_f1"), data_keys=frozenset({"max_len"}),
                        reads="CoNLL files", arch_kind="tag", selectable=("span_f1",), decoded=("span_f1",),
                        default_max_len=MAX_LEN, counts="sentences", label_kind="tag")

    def prepare(self, inp: StageInput) -> tuple[TagData, str]:
        train, val = inp.files()
        digest = inp.digest(self.name, (train, val))
        files = inp.example_files(train, val, self.max_len(inp.config), self.table_format(inp.config, inp.where))
        data = prepare_tag(files, vocab_size=inp.word_vocab_size)
        return data, digest.hexdigest()

    def root_model(self, cfg: ModelConfig, data: TagData) -> nn.Module:
        def token_classifier(arch: str, keys: dict[str, Any]) -> nn.Module:
            """A transformers token classifier (e.g. bert): one position per word."""
            from transformers import AutoModelForTokenClassification
            from transformers.models.auto import modeling_auto

            check_arch(arch, modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "a token-classification head")
            id2label = dict(enumerate(data.tag_map.labels))
            return from_config(AutoModelForTokenClassification, arch, keys, vocab_size=data.vocab.get_vocab_size(),
                               num_labels=len(id2label), pad_token_id=PAD_ID, id2label=id2label,
                               label2id={v: i for i, v in id2label.items()})

        return root_model(cfg, self, self.sizes(data), token_classifier)

    @staticmethod
    def sizes(data: TagData) -> dict[str, int]:
        return {"num_tags": len(data.tag_map), "vocab_size": data.vocab.get_vocab_size()}

    def labels(self, data: TagData) -> list[str]:
        return list(data.tag_map.labels)

    def bind(self, setup: StageSetup[TagData], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        return TagTask(setup.model, device, autocast, setup.data)

    def save(self, setup: StageSetup[TagData], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
        if not self.is_builtin(model_cfg):  # a token classifier from config (bert): its word vocabulary
            save_transformers(setup.model, setup.labels, auto_tokenizer(setup.data.vocab), out)
            return
        save_builtin(setup.model, {"task": self.name, "arch": model_cfg.arch, "settings": model_cfg.size_keys(),
                                   "sizes": self.sizes(setup.data), "labels": setup.labels},
                     {"tokenizer.json": setup.data.vocab}, out)

    def _tagger(self, stage: TrainedStage) -> tuple[nn.Module, Tokenizer]:
        """The tagger and its word vocabulary (one id per word: tasks.vocab.word_vocab)."""
        if stage.is_transformers:
            from transformers import AutoModelForTokenClassification

            model, _ = load_transformers(stage.directory, AutoModelForTokenClassification)
        else:
            model, _ = stage.builtin()
        return model, stage.tokenizer()

    @torch.no_grad()
    def generate(self, stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str:
        """Every whitespace-separated word with its tag (the tagger reads words as the CoNLL
        files give them: one id per word)."""
        assert stage.labels is not None
        model, vocab = self._tagger(stage)
        words = prompt.split()
        ids = torch.tensor([vocab.encode(words, is_pretokenized=True, add_special_tokens=False).ids])
        tags = logits_of(model, ids, torch.ones_like(ids)).argmax(dim=-1)[0].tolist()
        return " ".join(f"{word}/{stage.labels.decode(tag)}" for word, tag in zip(words, tags, strict=True))

    def evaluate_file(self, stage: TrainedStage, path: Path, fmt: str | None, beam: int) -> tuple[dict[str, Any], int]:
        assert stage.labels is not None
        records = read_conll(path)
        model, vocab = self._tagger(stage)
        rows = TagRows(*encode_tagging(records, vocab, stage.labels, stage.max_len, PAD_ID))
        # evaluate_tag scores data.val only; the rows stand in for the training rows an export lacks.
        metrics = evaluate_tag(model, TagData(vocab, stage.labels, rows, rows), stage.batch_size, torch.device("cpu"))
        return metrics, len(rows)
