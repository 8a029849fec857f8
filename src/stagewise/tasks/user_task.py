"""The user's own parts, passed from Python (`stagewise.train(plan, model=..., data=..., loss=...)`),
and the task that trains them (`task: python`): the user's loss `(model, batch) -> loss` over the
rows of the user's datasets, on the user's model.

Rows: a `datasets.Dataset` or `IterableDataset` (read to its end), a list of dicts, or a torch
`Dataset` whose items are dicts. Every column is numbers (or equal-length lists of numbers) and
becomes one tensor; a batch is a dict of column -> tensor of the batch's rows.

What takes part in the stage key (so a changed object gives a new key and an unchanged one
reuses the cache), and what does not:
- a model: its class (module and name), its `config` (`to_dict()`, when it has one) and its
  initial weights (every tensor of its state dict, as they are when training starts). Not: code
  its forward calls that is not part of the class, buffers outside its state dict.
- a dataset: `datasets`' own `_fingerprint` when it has one, else a hash of every row's content
  as read. Not: a torch Dataset's transforms other than what its items hold.
- a loss: its `version` attribute when the function declares one, else its qualified name and
  source code. Not: the globals, closure values or other functions it reads (declare a `version`
  and change it when those change). A loss without source (a builtin, a function typed into a
  console) must declare a `version`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_model
from torch import nn

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import ModelConfig
from stagewise.config.stage_config import StageConfig
from stagewise.data.split import held_out
from stagewise.errors import UserError
from stagewise.tasks.base import Batch, ExampleTask, Task
from stagewise.tasks.export import WEIGHTS
from stagewise.tasks.spec import StageInput, StageSetup, TaskSpec
from stagewise.tasks.traits import TaskTraits

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from tokenizers import Tokenizer


Loss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
PLACEHOLDER = "python_object"  # the plan's model / data key when the objects come from Python
TASK = "python"


@dataclass(frozen=True)
class UserParts:
    """What a Python caller brings: a model, datasets (the plan's: {"train", "val"}; a stage's:
    {stage name: {"train", "val"}}) and a loss. None: the plan's own."""

    model: nn.Module | None = None
    data: Mapping[str, Any] | None = None
    loss: Loss | None = None
    _fingerprints: dict[int, str] = field(default_factory=dict, compare=False, repr=False)

    def data_for(self, stage: str) -> Mapping[str, Any] | None:
        """The stage's datasets: its own, else the plan's."""
        if self.data is None:
            return None
        own = self.data.get(stage)
        return own if isinstance(own, Mapping) else (self.data if "train" in self.data else None)

    def model_fingerprint(self) -> str:
        assert self.model is not None
        return model_fingerprint(self.model)

    def check(self, stages: list[str]) -> None:
        """The combination is one this version trains, for a plan of `stages`; bad input is one line."""
        self.check_objects()
        if self.data is not None:
            extra = sorted(k for k in self.data if k not in ("train", "val") and k not in stages)
            if extra:
                raise UserError(f"data=[{extra[0]!r}]", f"neither train, val nor a stage (stages: {', '.join(stages)})")
            missing = [s for s in stages if self.data_for(s) is None]
            if missing:
                raise UserError("data=", f"no 'train' rows for stage '{missing[0]}' (give the plan's or the stage's)")

    def check_objects(self) -> None:
        """What can be told before the plan is read: the objects' kinds, and data with a loss."""
        if self.model is not None and not isinstance(self.model, nn.Module):
            raise UserError("model=", f"not a torch.nn.Module: {type(self.model).__name__}")
        if self.loss is not None and not callable(self.loss):
            raise UserError("loss=", f"not a function (model, batch) -> loss: {type(self.loss).__name__}")
        if self.data is not None and not isinstance(self.data, Mapping):
            raise UserError("data=", "a mapping: {'train': rows, 'val': rows} or {stage name: {'train': ...}}")
        if (self.data is None) != (self.loss is None):
            raise UserError("loss=" if self.loss is None else "data=",
                            "datasets and a loss come together: the loss (model, batch) -> loss reads the rows")


def model_fingerprint(model: nn.Module) -> str:
    """The class, config and current weights of a model (see the module's docstring)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def check_vocab(model: nn.Module, vocab_size: int) -> nn.Module:
    """A causal LM passed in for the plan's token streams (causal_lm, sft stages): a transformers
    model whose embeddings cover the plan's tokenizer."""
    if not callable(getattr(model, "save_pretrained", None)) or getattr(model, "config", None) is None:
        raise UserError("model=", f"the plan's {vocab_size}-token streams train a transformers causal LM "
                                  f"(a PreTrainedModel), not a {type(model).__name__}; any module trains on your "
                                  "rows with your loss (data=, loss=)")
    get = getattr(model, "get_input_embeddings", None)
    rows = getattr(get() if callable(get) else None, "num_embeddings", None)
    if rows is not None and rows < vocab_size:
        raise UserError("model=", f"its input embeddings hold {rows} tokens, fewer than the plan's tokenizer's "
                                  f"{vocab_size}")
    return model


def loss_fingerprint(loss: Loss) -> str:
    """A loss's declared `version`, else its qualified name and source (module docstring)."""
    version = getattr(loss, "version", None)
    name = getattr(loss, "__qualname__", type(loss).__qualname__)
    if version is not None:
        return hashlib.sha256(f"{name}:version:{version}".encode()).hexdigest()[:16]
    try:
        source = inspect.getsource(loss if inspect.isfunction(loss) or inspect.ismethod(loss) else type(loss))
    except (OSError, TypeError):
        raise UserError("loss=", f"cannot read the source of {name} to fingerprint it: give it a version "
                                "(loss.version = '1') and change it when the loss changes") from None
    return hashlib.sha256(f"{name}:{source}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TensorRows:
    """A dataset's columns, one tensor each (rows first)."""

    columns: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return self.tensors[0].size(0)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def digest(self) -> str:
        digest = hashlib.sha256(json.dumps(self.columns).encode())
        for t in self.tensors:
            digest.update(f"{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def read_rows(rows: Any, where: str) -> TensorRows:
    """A dataset's rows as column tensors; a row that does not fit is one line naming it."""
    items: Iterable[Any]
    if isinstance(rows, torch.utils.data.Dataset) and not hasattr(rows, "column_names"):
        items = (rows[i] for i in range(len(rows)))  # type: ignore[arg-type]
    elif isinstance(rows, Iterable) and not isinstance(rows, (str, bytes, Mapping)):
        items = rows
    else:
        raise UserError(where, f"rows: a datasets.Dataset, a list of dicts or a torch Dataset, not {type(rows).__name__}")
    columns: tuple[str, ...] | None = None
    values: list[list[Any]] = []
    for i, row in enumerate(items):
        if not isinstance(row, Mapping):
            raise UserError(f"{where}[{i}]", f"a row is a dict of column -> numbers, not {type(row).__name__}")
        if columns is None:
            columns = tuple(row)
            values = [[] for _ in columns]
        if tuple(row) != columns:
            raise UserError(f"{where}[{i}]", f"columns {list(row)} differ from the first row's {list(columns)}")
        for column, value in zip(values, row.values(), strict=True):
            column.append(value)
    if columns is None:
        raise UserError(where, "no rows")
    tensors = []
    for name, column in zip(columns, values, strict=True):
        try:
            tensors.append(torch.stack([torch.as_tensor(v) for v in column]))
        except (RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{where}[{name!r}]", f"every row's value must be numbers of one shape ({e})") from None
    return TensorRows(columns, tuple(tensors))


def rows_fingerprint(rows: Any, read: TensorRows) -> str:
    """`datasets`' own fingerprint when the rows have one, else their content's."""
    own = getattr(rows, "_fingerprint", None)
    return f"datasets:{own}" if isinstance(own, str) else read.digest()


@dataclass(frozen=True)
class UserData:
    """A stage's rows, split, with the model and loss they train."""

    train: TensorRows
    val: TensorRows
    model: nn.Module
    loss: Loss


class UserTask(ExampleTask):
    kind = TASK

    def __init__(self, model: nn.Module, device: torch.device,
                 autocast: Callable[[], AbstractContextManager[None]], data: UserData) -> None:
        super().__init__(model, device, autocast, data.train, vocab_size=2)
        self.data = data

    def _batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        return dict(zip(self.data.train.columns, batch, strict=True))

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        loss = self.data.loss(self.model, self._batch(batch))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise UserError("loss=", f"must return a scalar tensor, returned {type(loss).__name__}"
                                    + (f" of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        return loss

    @torch.no_grad()
    def metrics(self, batch_size: int) -> dict[str, float]:
        self.model.eval()
        val, total = self.data.val, 0.0
        for start in range(0, len(val), batch_size):
            index = torch.arange(start, min(start + batch_size, len(val)))
            batch = tuple(t.to(self.device) for t in val.rows(index))
            total += float(self.batch_loss(batch)) * index.numel()
        return {"val_loss": total / len(val)}

    def corrupt(self, batch: Batch, step: int) -> Batch:
        """Integer columns get random values from their own range: a data-pipeline bug."""
        g = torch.Generator().manual_seed(step)
        return tuple(torch.randint(0, max(int(t.max()) + 1, 2), t.shape, generator=g).to(t.device)
                     if not t.is_floating_point() else t for t in batch)


class UserTaskSpec(TaskSpec[UserData]):
    name = TASK
    traits = TaskTraits(family=TASK, metrics=("val_loss", "train_loss"), data_keys=frozenset(),
                        reads="the rows passed from Python")

    def prepare(self, inp: StageInput) -> tuple[UserData, str]:
        parts = inp.parts
        data = parts.data_for(inp.stage) if parts is not None else None
        if parts is None or data is None or parts.loss is None:
            raise UserError(inp.where, "task python trains the model, rows and loss passed to stagewise.train "
                                       "(model=, data=, loss=)")
        where = f"data=[{inp.stage!r}]" if parts.data is not None and inp.stage in parts.data else "data="
        train = read_rows(data["train"], f"{where}['train']")
        if data.get("val") is not None:
            val = read_rows(data["val"], f"{where}['val']")
            if val.columns != train.columns:
                raise UserError(f"{where}['val']", f"columns {list(val.columns)} differ from train's {list(train.columns)}")
            fingerprints = [rows_fingerprint(data["train"], train), rows_fingerprint(data["val"], val)]
        else:  # held out of train by the plan's seed
            keep, held = held_out(len(train), inp.config.val_fraction, inp.plan.seed)
            if not keep:
                raise UserError(f"{where}['train']", f"{len(train)} rows: none left to train on after val_fraction")
            val = TensorRows(train.columns, tuple(t[held] for t in train.tensors))
            fingerprints = [rows_fingerprint(data["train"], train), f"val_fraction {inp.config.val_fraction}"]
            train = TensorRows(train.columns, tuple(t[keep] for t in train.tensors))
        if parts.model is None:
            raise UserError("model=", "task python trains a model passed to stagewise.train (model=)")
        fingerprint = hashlib.sha256(json.dumps([TASK, *fingerprints, loss_fingerprint(parts.loss),
                                                 inp.plan.seed]).encode()).hexdigest()
        return UserData(train, val, parts.model, parts.loss), fingerprint

    def root_model(self, cfg: ModelConfig, data: UserData) -> nn.Module:
        return data.model

    def bind(self, setup: StageSetup[UserData], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        return UserTask(setup.model, device, autocast, setup.data)

    def save(self, setup: StageSetup[UserData], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
        """A transformers model as save_pretrained writes it; any other as its state dict (safetensors)."""
        out.mkdir(parents=True, exist_ok=True)
        if callable(save := getattr(setup.model, "save_pretrained", None)):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # save_pretrained's shard bars would interleave with ours
            save(out)
        else:
            save_model(setup.model, str(out / WEIGHTS))
