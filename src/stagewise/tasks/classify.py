"""The `classify` task: (text, label) files -> encoded tensors -> a resumable batch source, the
loss of a batch and the validation metrics (val_loss, val_accuracy, val_macro_f1). Batches come
from tasks.batches.ExampleSampler over `Encoded`.

The model is any module mapping (input_ids=, attention_mask=) to logits (B, classes): the
built-in models.bigru.BiGRUClassifier, or a transformers sequence-classification head on an LM
backbone (models.heads.classifier_from_lm).
"""

from __future__ import annotations

import hashlib
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
from stagewise.config.plan_config import ModelConfig, Plan
from stagewise.config.stage_config import StageConfig
from stagewise.data.tables import Field
from stagewise.data.tokenizers import eos_id, warn_unknown
from stagewise.models.heads import classifier_from_lm
from stagewise.tasks.base import ExampleTask, Task
from stagewise.tasks.batches import ExampleFiles
from stagewise.tasks.encode import encode_classification
from stagewise.tasks.export import TrainedStage, auto_tokenizer, load_transformers, save_builtin, save_transformers
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.lm import save_lm
from stagewise.tasks.metrics import accuracy, macro_f1
from stagewise.tasks.models import check_arch, from_config, root_model
from stagewise.tasks.readers import read_labeled
from stagewise.tasks.spec import GenerateOptions, StageInput, StageSetup, TaskSpec, column
from stagewise.tasks.traits import TaskTraits
from stagewise.tasks.vocab import PAD_ID, word_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels
MAX_LEN = 128  # tokens per text when the data sets no max_len
SCORES = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class Encoded:
    input_ids: torch.Tensor  # (N, T) right-padded
    attention_mask: torch.Tensor  # (N, T) 1 on real tokens
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return self.labels.size(0)

    def rows(self, index: torch.Tensor) -> Batch:
        """The rows `index`, cut to their longest text: a batch of short SMS pays for no padding
        of the longest one in the file."""
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        return self.input_ids[index, :width], mask[:, :width], self.labels[index]


@dataclass(frozen=True)
class ClassifyData:
    tokenizer: Tokenizer
    label_map: LabelMap  # from the training labels only: a validation label outside it is refused
    train: Encoded
    val: Encoded
    fingerprint: str  # of the records, the split and the tokenizer: part of the stage key
    pad_id: int  # what pads the rows (a backbone's EOS; models.heads reads the last token before it)


def prepare_classify(files: ExampleFiles, text_field: Field, label_field: Field, *, vocab_size: int = 10_000,
                     tokenizer: Tokenizer | None = None, pad_id: int = PAD_ID,
                     unknown: Counter[str] | None = None) -> ClassifyData:
    """Read and encode the records. Without a validation file, a seeded shuffle holds out a
    fraction of the training file (SMS spam is ordered by nothing, but other files are often
    sorted by label, so a tail split would be one class). `tokenizer` None: a word vocabulary
    built from the training texts (the BiGRU recipe); a backbone's own tokenizer otherwise, with
    `pad_id` its EOS (the GPT-2 head finds each row's last token by it: see models.heads).
    `unknown`: counts the symbols the tokenizer does not know (tasks.encode)."""
    train, val = files.split(lambda path: read_labeled(path, text_field, label_field, files.fmt))
    max_len = files.max_len or MAX_LEN
    tok = tokenizer if tokenizer is not None else word_tokenizer((t for t, _ in train), vocab_size)
    label_map = LabelMap.from_labels(label for _, label in train)
    encoded = [Encoded(*encode_classification(part, tok, label_map, max_len, pad_id, unknown)) for part in (train, val)]
    digest = hashlib.sha256()
    for part in (train, val):
        for text, label in part:
            digest.update(f"{label}\0{text}\n".encode())
    digest.update(tok.to_str().encode())
    digest.update(f"{max_len}\0{pad_id}".encode())
    return ClassifyData(tok, label_map, encoded[0], encoded[1], digest.hexdigest(), pad_id)


def classify_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the batch's labels."""
    input_ids, mask, labels = batch
    return F.cross_entropy(logits_of(model, input_ids, mask), labels)


def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """fp32 logits, (B, classes) or per token (B, T, tags), from a built-in model (a tensor) or a
    transformers head (an output object); by keyword, since a transformers model's second
    positional is its cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return getattr(out, "logits", out).float()


@torch.no_grad()
def evaluate_classify(model: nn.Module, data: Encoded, batch_size: int, device: torch.device) -> dict[str, float]:
    """val_loss (example-weighted), val_accuracy and val_macro_f1 over the whole set, in order."""
    was_training = model.training
    model.eval()
    total, predictions = 0.0, []
    for start in range(0, len(data), batch_size):
        input_ids, mask, labels = (t.to(device) for t in data.rows(torch.arange(start, min(start + batch_size, len(data)))))
        logits = logits_of(model, input_ids, mask)
        total += F.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).cpu())
    model.train(was_training)
    predicted = torch.cat(predictions).numpy()
    references = data.labels.numpy()
    return {"val_loss": total / len(data), "val_accuracy": accuracy(predicted, references),
            "val_macro_f1": macro_f1(predicted, references)}


def majority_accuracy(data: ClassifyData) -> float:
    """The trivial baseline: always predict the most frequent training label."""
    majority = int(torch.bincount(data.train.labels).argmax())
    return float((data.val.labels == majority).float().mean())


class ClassifyTask(ExampleTask):
    kind = "classify"

    def __init__(self, model: nn.Module, device: torch.device, autocast: Any, data: ClassifyData,
                 scores: tuple[str, ...] = SCORES) -> None:
        super().__init__(model, device, autocast, data.train, data.tokenizer.get_vocab_size())
        self.data, self.scores = data, scores

    def batch_loss(self, batch: Batch) -> torch.Tensor:  # type: ignore[override]
        return classify_loss(self.model, batch)

    def metrics(self, batch_size: int) -> dict[str, float]:
        """val_loss and the scores `eval.metrics` selects (both, unless told)."""
        metrics = evaluate_classify(self.model, self.data.val, batch_size, self.device)
        return {k: v for k, v in metrics.items() if k == "val_loss" or k.removeprefix("val_") in self.scores}


class ClassifySpec(TaskSpec[ClassifyData]):
    name = "classify"
    traits = TaskTraits(family="classify", metrics=("val_loss", "train_loss", "val_accuracy", "val_macro_f1"),
                        data_keys=frozenset({"field", "label", "max_len"}), reads="csv, tsv or jsonl files",
                        arch_kind="classify", heads_on_lm=True, selectable=SCORES, decoded=SCORES,
                        formats=("auto", "csv", "tsv", "json"), table_files=True, default_max_len=MAX_LEN)

    def uses_lm_tokenizer(self, parent: StageSetup[Any] | None, plan: Plan) -> bool:
        """A head on the parent's LM reads its tokenizer; a classifier from config reads words."""
        return (parent is None or parent.lm_based) and plan.tokenizer.kind != "word"

    def prepare(self, inp: StageInput) -> tuple[ClassifyData, str]:
        train, val = inp.files()
        digest = inp.digest(self.name, (train, val))
        files = inp.example_files(train, val, self.max_len(inp.config), self.table_format(inp.config, inp.where))
        text, label = column(inp.config, "field"), column(inp.config, "label")
        if inp.lm_based:
            lm = inp.lm_data
            digest.update(lm.fingerprint.encode())
            unknown: Counter[str] = Counter()
            data = prepare_classify(files, text, label, tokenizer=lm.tokenizer, pad_id=eos_id(lm.tokenizer),
                                    unknown=unknown)
            warn_unknown(unknown, inp.where, f"the {len(data.train) + len(data.val)} texts")
        else:
            data = prepare_classify(files, text, label, vocab_size=inp.word_vocab_size)
        return data, digest.hexdigest()

    def root_model(self, cfg: ModelConfig, data: ClassifyData) -> nn.Module:
        def sequence_classifier(arch: str, keys: dict[str, Any]) -> nn.Module:
            from transformers import AutoModelForSequenceClassification
            from transformers.models.auto import modeling_auto

            check_arch(arch, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                       "a sequence-classification head")
            id2label = dict(enumerate(data.label_map.labels))
            return from_config(AutoModelForSequenceClassification, arch, keys,
                               vocab_size=data.tokenizer.get_vocab_size(), num_labels=len(id2label), pad_token_id=PAD_ID,
                               id2label=id2label, label2id={v: i for i, v in id2label.items()})

        return root_model(cfg, self, self.sizes(data), sequence_classifier)

    @staticmethod
    def sizes(data: ClassifyData) -> dict[str, int]:
        return {"num_classes": len(data.label_map), "vocab_size": data.tokenizer.get_vocab_size()}

    def head_model(self, lm: nn.Module, data: ClassifyData, where: str) -> nn.Module:
        model, _ = classifier_from_lm(lm, len(data.label_map), data.pad_id, where)  # type: ignore[arg-type]
        return model

    def labels(self, data: ClassifyData) -> list[str]:
        return list(data.label_map.labels)

    def longest_example(self, data: ClassifyData) -> int:
        return max(part.input_ids.size(1) for part in (data.train, data.val))

    def bind(self, setup: StageSetup[ClassifyData], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        return ClassifyTask(setup.model, device, autocast, setup.data, tuple(cfg.eval.metrics or SCORES))

    def save(self, setup: StageSetup[ClassifyData], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
        if setup.lm_based:
            save_lm(setup, lm_tokenizer, model_cfg, out)
        elif not self.is_builtin(model_cfg):  # a classifier from config (bert): its word vocabulary
            save_transformers(setup.model, setup.labels, auto_tokenizer(setup.data.tokenizer), out)
        else:
            save_builtin(setup.model, {"task": self.name, "arch": model_cfg.arch, "settings": model_cfg.size_keys(),
                                       "sizes": self.sizes(setup.data), "labels": setup.labels},
                         {"tokenizer.json": setup.data.tokenizer}, out)

    def _classifier(self, stage: TrainedStage) -> tuple[nn.Module, Tokenizer, int]:
        """The classifier, the tokenizer its texts were encoded with and the id that padded them."""
        if stage.is_transformers:
            from transformers import AutoModelForSequenceClassification

            model, _ = load_transformers(stage.directory, AutoModelForSequenceClassification)
            return model, stage.tokenizer(), model.config.pad_token_id
        model, _ = stage.builtin()
        return model, stage.tokenizer(), PAD_ID

    @torch.no_grad()
    def generate(self, stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str:
        """The predicted label and its probability."""
        assert stage.labels is not None
        model, tok, _ = self._classifier(stage)
        ids = torch.tensor([tok.encode(prompt).ids[: stage.max_len]])  # as encode_classification cuts
        probs = logits_of(model, ids, torch.ones_like(ids)).softmax(dim=-1)[0]
        best = int(probs.argmax())
        return f"{stage.labels.decode(best)} ({float(probs[best]):.3f})"

    def evaluate_file(self, stage: TrainedStage, path: Path, fmt: str | None, beam: int) -> tuple[dict[str, Any], int]:
        assert stage.labels is not None
        records = read_labeled(path, column(stage.data, "field"), column(stage.data, "label"), fmt)
        model, tok, pad_id = self._classifier(stage)
        rows = Encoded(*encode_classification(records, tok, stage.labels, stage.max_len, pad_id))
        return evaluate_classify(model, rows, stage.batch_size, torch.device("cpu")), len(rows)
