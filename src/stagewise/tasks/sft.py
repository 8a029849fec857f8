"""The `sft` task: prompt/completion JSONL (or `messages` rendered with a chat template) ->
(input_ids, labels) rows -> the loss over completion tokens only, and val_loss / val_ppl.

The model is a transformers causal LM, usually trained in an earlier stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from stagewise.data.tokenizers import eos_id
from stagewise.plan.schema import DataConfig, ModelConfig, StageConfig
from stagewise.tasks.base import Batch, ExampleTask, Task
from stagewise.tasks.export import TrainedStage
from stagewise.tasks.lm import continue_text, load_causal_lm, save_lm
from stagewise.tasks.spec import LM_FAMILY, GenerateOptions, StageInput, StageSetup, TaskSpec
from stagewise.tasks.batches import split_records
from stagewise.tasks.encode import IGNORE, encode_sft
from stagewise.tasks.readers import ChatTemplate, read_prompt_completion

MAX_LEN = 256  # tokens per example (prompt and completion) when the data sets no max_len


@dataclass(frozen=True)
class SftRows:
    input_ids: torch.Tensor  # (N, T), EOS-padded on the right
    labels: torch.Tensor  # (N, T), -100 on prompt tokens and padding; aligned with input_ids

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows `index`, cut after their last labelled token (the padding teaches nothing)."""
        labels = self.labels[index]
        width = int((labels != IGNORE).nonzero()[:, 1].max()) + 1
        return self.input_ids[index, :width], labels[:, :width]


@dataclass(frozen=True)
class SftData:
    train: SftRows
    val: SftRows


def prepare_sft(train_path: Path, tokenizer: Tokenizer, eos_id: int, max_len: int, *, val_path: Path | None = None,
                val_fraction: float = 0.1, seed: int = 0, pack: bool = False,
                template: ChatTemplate = ChatTemplate()) -> SftData:
    """Validation rows are never packed: each example's loss is then measured on its own."""
    records = read_prompt_completion(train_path, template)
    if val_path is not None:
        train, val = records, read_prompt_completion(val_path, template)
    else:
        train, val = split_records(records, val_fraction, seed)
    return SftData(SftRows(*encode_sft(train, tokenizer, eos_id, max_len, pack)),
                   SftRows(*encode_sft(val, tokenizer, eos_id, max_len, pack=False)))


def sft_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (and their EOS) only."""
    input_ids, labels = batch
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def evaluate_sft(model: nn.Module, data: SftRows, batch_size: int, device: torch.device) -> dict[str, float]:
    """val_loss weighted by completion tokens over the whole set, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        input_ids, labels = (t.to(device) for t in data.rows(torch.arange(start, min(start + batch_size, len(data)))))
        n = int((labels[:, 1:] != IGNORE).sum())
        total += sft_loss(model, (input_ids, labels)).item() * n
        count += n
    model.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


class SftTask(ExampleTask):
    kind = "sft"

    def __init__(self, model: nn.Module, device: torch.device, autocast: Any, data: SftData, vocab_size: int) -> None:
        super().__init__(model, device, autocast, data.train, vocab_size)
        self.data = data

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        return sft_loss(self.model, batch)  # type: ignore[arg-type]

    def metrics(self, batch_size: int) -> dict[str, float]:
        return evaluate_sft(self.model, self.data.val, batch_size, self.device)

    def corrupt(self, batch: Batch, step: int) -> Batch:
        ids, labels = batch
        g = torch.Generator().manual_seed(step)
        bad = torch.randint(0, self.vocab_size, ids.shape, generator=g).to(ids.device)
        return bad, torch.where(labels == IGNORE, labels, bad)


class SftSpec(TaskSpec):
    name = "sft"
    family = LM_FAMILY
    samples = True
    metrics = ("val_loss", "val_ppl", "train_loss")
    data_keys = frozenset({"max_len", "pack"})
    formats = ("auto", "json")
    reads = "JSONL files"
    default_max_len = MAX_LEN

    def prepare(self, inp: StageInput) -> tuple[Any, str]:
        train, val = inp.files()
        digest = inp.digest(self.name, (train, val))
        self.table_format(inp.config, inp.where)
        lm = inp.lm_data
        digest.update(lm.fingerprint.encode())
        data = prepare_sft(train, lm.tokenizer, eos_id(lm.tokenizer), pack=inp.config.pack,
                           **inp.split_args(val, self.max_len(inp.config)))
        return data, digest.hexdigest()

    def longest_example(self, data: Any) -> int:
        return max(part.input_ids.size(1) for part in (data.train, data.val))

    def bind(self, setup: StageSetup, cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        return SftTask(setup.model, device, autocast, setup.data,
                       setup.model.get_input_embeddings().num_embeddings)  # type: ignore[operator]

    def save(self, setup: StageSetup, lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
        save_lm(setup, lm_tokenizer, out)

    def generate(self, stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str:
        return continue_text(stage, prompt, opts)

    def evaluate_file(self, stage: TrainedStage, path: Path, fmt: str | None, beam: int) -> tuple[dict[str, Any], int]:
        tok = stage.tokenizer()
        # Validation rows are never packed (prepare_sft): each example's loss on its own.
        rows = SftRows(*encode_sft(read_prompt_completion(path), tok, eos_id(tok), stage.max_len, pack=False))
        model, _ = load_causal_lm(stage)
        return evaluate_sft(model, rows, stage.batch_size, torch.device("cpu")), len(rows)
