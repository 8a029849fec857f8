"""The `sft` task: prompt/completion JSONL (or `messages` rendered with the plan's chat template,
tasks.chat) -> (input_ids, labels) rows -> the loss over completion tokens only, val_loss /
val_ppl, and on request (`eval.metrics`) the text metrics of greedy replies to the validation
prompts: ROUGE for summaries, exact match and token F1 for answers, BLEU / chrF.

The model is a transformers causal LM: trained in an earlier stage, or pretrained.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from stagewise.data.documents import Documents
from stagewise.data.sources import Corpus
from stagewise.data.tokenizers import eos_id, warn_unknown
from stagewise.models.build import context_length
from stagewise.models.generate import sample
from stagewise.tasks.base import Batch, ExampleTask, Task
from stagewise.tasks.batches import ExampleFiles
from stagewise.tasks.chat import ChatTemplate
from stagewise.tasks.encode import IGNORE, encode_sft, targets
from stagewise.tasks.export import TrainedStage
from stagewise.tasks.lm import continue_text, lm_stop, load_causal_lm, save_lm, stage_template
from stagewise.tasks.metrics import TEXT_METRICS, text_scores
from stagewise.tasks.readers import read_prompt_completion
from stagewise.tasks.spec import LM_FAMILY, GenerateOptions, StageInput, StageSetup, TaskSpec, data_files
from stagewise.tasks.traits import TaskTraits

MAX_LEN = 256  # tokens per example (prompt and completion) when the data sets no max_len


@dataclass(frozen=True)
class SftRows:
    input_ids: torch.Tensor  # (N, T), EOS-padded on the right
    labels: torch.Tensor  # (N, T), -100 on prompt tokens and padding; aligned with input_ids
    position_ids: torch.Tensor | None = None  # (N, T) packed rows: restarting with each example (encode_sft)
    references: tuple[str, ...] = ()  # unpacked rows: each completion's reply (ChatTemplate.reply), for metrics

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows `index` (input_ids, labels and, packed, position_ids), cut after their last
        labelled token (the padding teaches nothing)."""
        labels = self.labels[index]
        width = int((labels != IGNORE).nonzero()[:, 1].max()) + 1
        packed = () if self.position_ids is None else (self.position_ids[index, :width],)
        return self.input_ids[index, :width], labels[:, :width], *packed

    def prompt(self, i: int) -> list[int]:
        """An unpacked row's prompt: its tokens before the first labelled one."""
        return self.input_ids[i, : int((self.labels[i] != IGNORE).nonzero()[0])].tolist()


@dataclass(frozen=True)
class SftData:
    train: SftRows
    val: SftRows
    tokenizer: Tokenizer  # what encoded them, and decodes generated completions
    eos_id: int
    template: ChatTemplate  # what rendered `messages` rows, and ends a generated reply


def prepare_sft(files: ExampleFiles, tokenizer: Tokenizer, eos_id: int, *, pack: bool = False,
                template: ChatTemplate | None = None, unknown: Counter[str] | None = None) -> SftData:
    """Validation rows are never packed: each example's loss is then measured on its own.
    `template`: of `messages` rows (default: the built-in one); `unknown`: counts the symbols the
    tokenizer does not know (tasks.encode)."""
    template = template or ChatTemplate()
    max_len = files.max_len or MAX_LEN
    train, val = files.split(lambda path: read_prompt_completion(path, template))
    return SftData(SftRows(*encode_sft(train, tokenizer, eos_id, max_len, pack, unknown)),
                   sft_rows(val, tokenizer, eos_id, max_len, template, unknown), tokenizer, eos_id, template)


def sft_rows(records: list[tuple[str, str]], tokenizer: Tokenizer, eos_id: int, max_len: int, template: ChatTemplate,
             unknown: Counter[str] | None = None) -> SftRows:
    """Unpacked rows with their references: what validation measures."""
    input_ids, labels, _ = encode_sft(records, tokenizer, eos_id, max_len, False, unknown)
    return SftRows(input_ids, labels, references=tuple(template.reply(c) for _, c in records))


def sft_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (and their EOS) only; a packed
    batch's position_ids keep each example's attention to itself."""
    input_ids, labels, *packed = batch
    positions = {"position_ids": packed[0]} if packed else {}
    logits = model(input_ids=input_ids, use_cache=False, **positions).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def evaluate_sft(model: nn.Module, data: SftRows, batch_size: int, device: torch.device) -> dict[str, float]:
    """val_loss weighted by completion tokens over the whole set, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        input_ids, labels = (t.to(device) for t in data.rows(torch.arange(start, min(start + batch_size, len(data)))))
        n = int(targets(labels[:, 1:]).sum())
        total += sft_loss(model, (input_ids, labels)).item() * n
        count += n
    model.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate_replies(model: nn.Module, data: SftData, rows: SftRows, limit: int | None, max_len: int,
                     device: torch.device) -> list[str]:
    """Greedy completions of the first `limit` rows' prompts (None: all), each ending at EOS or the
    template's end marker and at most the rest of the row's max_len, as replies (ChatTemplate.reply)."""
    tok, template = data.tokenizer, data.template
    stop = lm_stop([data.eos_id], lambda text: tok.encode(text, add_special_tokens=False).ids,
                   lambda ids: tok.decode(ids, skip_special_tokens=True), template, ())
    context = context_length(model)
    replies = []
    for i in range(len(rows) if limit is None else min(limit, len(rows))):
        prompt = rows.prompt(i) or [data.eos_id]  # an empty prompt: unconditional, as generate starts it
        out = sample(model, torch.tensor([prompt], device=device), max(1, max_len - len(prompt)), context,
                     temperature=0.0, stop=stop)
        generated, text = stop.cut(out[0, len(prompt):].tolist())
        replies.append(template.reply(text if text is not None else tok.decode(generated, skip_special_tokens=True)))
    return replies


def evaluate_generated(model: nn.Module, data: SftData, rows: SftRows, metrics: tuple[str, ...], limit: int | None,
                       max_len: int, device: torch.device) -> dict[str, float]:
    """The text metrics of greedy replies to the first `limit` validation prompts."""
    replies = generate_replies(model, data, rows, limit, max_len, device)
    return text_scores(metrics, replies, rows.references[: len(replies)])


class SftTask(ExampleTask):
    kind = "sft"

    def __init__(self, model: nn.Module, device: torch.device, autocast: Any, data: SftData, vocab_size: int,
                 metrics: tuple[str, ...], max_len: int) -> None:
        super().__init__(model, device, autocast, data.train, vocab_size)
        self.data, self.text_metrics, self.max_len = data, metrics, max_len

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        return sft_loss(self.model, batch)

    def targets(self, batch: Batch) -> torch.Tensor:
        return targets(batch[1][:, 1:])  # the completion tokens sft_loss predicts

    def evaluate(self, block_size: int, batch_size: int, limit: int | None) -> dict[str, float]:
        """The loss over every validation example; replies decoded for `eval.metrics` from the first
        `limit` batches' prompts."""
        with self.autocast():
            metrics = self.metrics(batch_size)
            if self.text_metrics:
                metrics |= evaluate_generated(self.model, self.data, self.data.val, self.text_metrics,
                                              None if limit is None else limit * batch_size, self.max_len,
                                              self.device)
        return metrics

    def metrics(self, batch_size: int) -> dict[str, float]:
        return evaluate_sft(self.model, self.data.val, batch_size, self.device)

    def corrupt(self, batch: Batch, step: int) -> Batch:
        ids, labels = batch[:2]
        g = torch.Generator().manual_seed(step)
        bad = torch.randint(0, self.vocab_size, ids.shape, generator=g).to(ids.device)
        return bad, torch.where(labels == IGNORE, labels, bad), *batch[2:]


class SftSpec(TaskSpec[SftData]):
    name = "sft"
    traits = TaskTraits(family=LM_FAMILY, metrics=("val_loss", "val_ppl", "train_loss"),
                        data_keys=frozenset({"max_len", "pack"}), reads="JSONL files", arch_kind=LM_FAMILY,
                        samples=True, selectable=TEXT_METRICS,  # of greedy replies to the validation prompts
                        takes_adapters=True, formats=("auto", "json"), default_max_len=MAX_LEN)

    def plan_corpus(self, cfg: DataConfig, plan_dir: Path, seed: int, template: ChatTemplate) -> Corpus | None:
        """The examples as the model reads them (prompt + completion), split as prepare splits them:
        the plan's tokenizer is then built from (and knows) every symbol of the rendered rows."""
        train_path, val_path = data_files(cfg, "data", plan_dir)
        files = ExampleFiles(train_path, val_path, cfg.val_fraction, seed)
        train, val = files.split(lambda path: read_prompt_completion(path, template))
        digest = hashlib.sha256(json.dumps([self.name, cfg.model_dump(mode="json"), seed, template.source]).encode())
        texts = ([p + c for p, c in train], [p + c for p, c in val])
        for part in texts:
            digest.update(json.dumps(part).encode())
        return Corpus(Documents.of(texts[0], str(train_path)), Documents.of(texts[1], str(val_path or train_path)),
                      [p for p in (train_path, val_path) if p is not None], digest.hexdigest())

    def prepare(self, inp: StageInput) -> tuple[SftData, str]:
        train, val = inp.files()
        digest = inp.digest(self.name, (train, val))
        self.table_format(inp.config, inp.where)
        lm = inp.lm_data
        template = inp.template or ChatTemplate()
        digest.update(lm.fingerprint.encode())
        digest.update(template.source.encode())
        unknown: Counter[str] = Counter()
        data = prepare_sft(inp.example_files(train, val, self.max_len(inp.config), None), lm.tokenizer,
                           eos_id(lm.tokenizer), pack=inp.config.pack, template=template, unknown=unknown)
        warn_unknown(unknown, inp.where, f"the {len(data.train) + len(data.val)} sft examples")
        return data, digest.hexdigest()

    def longest_example(self, data: SftData) -> int:
        return max(part.input_ids.size(1) for part in (data.train, data.val))

    def bind(self, setup: StageSetup[SftData], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        return SftTask(setup.model, device, autocast, setup.data,
                       setup.model.get_input_embeddings().num_embeddings,  # type: ignore[operator]
                       tuple(cfg.eval.metrics or ()), self.max_len(data_cfg))

    def save(self, setup: StageSetup[SftData], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
        save_lm(setup, lm_tokenizer, model_cfg, out)

    def generate(self, stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str:
        return continue_text(stage, prompt, opts)

    def evaluate_file(self, stage: TrainedStage, path: Path, fmt: str | None, beam: int) -> tuple[dict[str, Any], int]:
        """The loss of the file's completions, and the stage's `eval.metrics` of greedy replies to
        every prompt in it."""
        tok = stage.tokenizer()
        template = stage_template(stage.directory)
        # Validation rows are never packed (prepare_sft): each example's loss on its own.
        rows = sft_rows(read_prompt_completion(path, template), tok, eos_id(tok), stage.max_len, template)
        model, _ = load_causal_lm(stage)
        metrics = evaluate_sft(model, rows, stage.batch_size, torch.device("cpu"))
        if stage.metrics:
            data = SftData(rows, rows, tok, eos_id(tok), template)
            metrics |= evaluate_generated(model, data, rows, stage.metrics, None, stage.max_len, torch.device("cpu"))
        return metrics, len(rows)
