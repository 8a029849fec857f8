"""What a task is to the rest of stagewise: one `TaskSpec` per task module, found through
config.registry. The engine, the plan's checks, exports and the trained-run commands ask the spec;
nothing outside `tasks/` compares task or model names.

A spec declares its traits (tasks.traits.TaskTraits: data keys and defaults, the metrics it
reports, which tasks it can follow, ...) and does the task's required work, `TaskCore`: prepare a
stage's data (its own typed data, the spec's type parameter), build its model, bind the training
`Task` (tasks.base). What a task may do besides (save an export; from one, generate and evaluate
a file) are the protocols of tasks.traits.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from torch import nn

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import ModelConfig, Plan
from stagewise.config.registry import TASKS, arch_model
from stagewise.config.stage_config import EvalConfig, StageConfig
from stagewise.errors import UserError
from stagewise.tasks.batches import ExampleFiles
from stagewise.tasks.traits import TaskTraits

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    import torch

    from stagewise.data.prepared_data import PreparedData
    from stagewise.data.sources import Corpus
    from stagewise.models.adapters import AdapterStep
    from stagewise.tasks.base import Task
    from stagewise.tasks.chat import ChatTemplate
    from stagewise.tasks.user_task import UserParts

LM_FAMILY = "causal_lm"  # the tasks that train a causal LM (causal_lm, sft)
D = TypeVar("D")  # a task's prepared data (PreparedData, SftData, ClassifyData, PairData, TagData, UserData)


@dataclass(frozen=True)
class StageSetup(Generic[D]):
    """A stage's data and model. `head`: the model is a new head on the parent's LM, whose
    backbone weights are carried into it when the stage starts. `lm_based`: a causal LM or a
    head on one (it reads the plan's tokenizer)."""

    spec: TaskSpec[D]
    data: D  # the spec's prepared data
    fingerprint: str  # of the stage's data as encoded: part of the stage key
    model: nn.Module
    lm_based: bool
    head: bool = False
    chat: ChatTemplate | None = None  # a causal LM's: how conversations become its text (kept with its export)
    adapter: AdapterStep | None = None  # what the stage does with adapters at its start (models.adapters)

    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def n_train(self) -> int:
        """What a pass over the training data holds: tokens (causal_lm) or examples."""
        return self.spec.n_train(self.data)

    @property
    def unit(self) -> str:
        return self.spec.traits.unit

    @property
    def labels(self) -> list[str] | None:
        return self.spec.labels(self.data)


@dataclass(frozen=True)
class StageInput:
    """What a spec prepares a stage's data from."""

    config: DataConfig  # the stage's own data, else the plan's
    where: str  # its key path: "stages[i].data" or "data"
    own: bool  # the stage has its own `data` (not the plan's)
    plan: Plan
    plan_dir: Path
    lm: PreparedData | None  # the plan's token streams and tokenizer (None with a word tokenizer)
    lm_based: bool  # the stage reads the plan's tokenizer
    template: ChatTemplate | None = None  # the plan's chat template (with the plan's tokenizer)
    cache_root: Path | None = None  # the token cache's, for a stage's own text in the plan's tokenizer
    stage: str = ""  # the name of the (first) stage reading it
    parts: UserParts | None = None  # what a Python caller passed (task python: tasks.user_task)

    @property
    def word_vocab_size(self) -> int:
        """The size of the word vocabularies the built-in models' data builds."""
        return self.plan.tokenizer.vocab_size or 10_000

    def files(self) -> tuple[Path, Path | None]:
        """The task's one training file and optional validation file, relative to the plan."""
        return data_files(self.config, self.where, self.plan_dir)

    def digest(self, task: str, files: tuple[Path, Path | None]) -> hashlib._Hash:
        """The fingerprint so far of data read from `files`: the settings and the bytes."""
        digest = hashlib.sha256(json.dumps([task, self.config.model_dump(mode="json"), self.plan.seed]).encode())
        for path in files:
            if path is not None:
                digest.update(path.read_bytes())
        return digest

    def example_files(self, train: Path, val: Path | None, max_len: int, fmt: str | None) -> ExampleFiles:
        """What a fine-tuning task's `prepare_*` reads: the stage's files (`files()`), its validation
        split, `max_len` tokens per example, the tables' format."""
        return ExampleFiles(train, val, self.config.val_fraction, self.plan.seed, max_len, fmt)

    @property
    def lm_data(self) -> PreparedData:
        assert self.lm is not None, "an LM-based stage has the plan's token streams"
        return self.lm


def data_files(cfg: DataConfig, where: str, plan_dir: Path) -> tuple[Path, Path | None]:
    """A fine-tuning task's one training file and optional validation file, relative to the plan."""
    paths: list[Path | None] = []
    for key in ("train", "val"):
        value = getattr(cfg, key)
        if value is None:
            paths.append(None)
            continue
        if not isinstance(value, str) or any(c in value for c in "*?[") or value.startswith("hub:"):
            raise UserError(f"{where}.{key}", "fine-tuning tasks read one local file (no list, glob or hub name)")
        path = (plan_dir / value).expanduser()
        if not path.is_file():
            raise UserError(f"{where}.{key}", f"no such file: {path}")
        paths.append(path)
    assert paths[0] is not None
    return paths[0], paths[1]


@dataclass(frozen=True)
class GenerateOptions:
    max_tokens: int | None = None  # None: the task's default
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    beam: int = 1
    stop: tuple[str, ...] = ()  # causal_lm, sft: texts that end a continuation (EOS and end markers always do)
    messages: tuple[dict[str, str], ...] | None = None  # causal_lm, sft: a conversation to reply to


# Data keys that name columns, and the column each reads when unset.
_COLUMNS = {"field": "text", "label": "label", "source": "source", "target": "target"}
TASK_DATA_KEYS = frozenset({"field", "label", "source", "target", "max_len", "pack"})


def column(cfg: DataConfig, key: str) -> str | int:
    """The column the data key `key` (field, label, source, target) names, or its default."""
    value = getattr(cfg, key)
    return _COLUMNS[key] if value is None else value


@runtime_checkable
class TaskCore(Protocol):
    """What every task does: prepare a stage's data (and its fingerprint, part of the stage key),
    build the plan's model for a first stage, bind the training `Task` over a stage's model."""

    name: str
    traits: TaskTraits

    def prepare(self, inp: StageInput) -> tuple[Any, str]: ...

    def root_model(self, cfg: ModelConfig, data: Any) -> nn.Module: ...

    def bind(self, setup: StageSetup[Any], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task: ...


class TaskSpec(ABC, Generic[D]):
    """The base of the tasks: the core (TaskCore) to implement, and what the plan's checks ask
    of a task, from its traits."""

    name: ClassVar[str]
    traits: ClassVar[TaskTraits]

    def is_builtin(self, cfg: ModelConfig) -> bool:
        """The plan's model is one stagewise builds for this task (config.registry.ARCHS), not a
        transformers one."""
        return arch_model(cfg.arch, self.traits.model_kind) is not None

    # --- the plan --------------------------------------------------------------------------------

    def max_len(self, cfg: DataConfig) -> int:
        """Tokens (tag: words) per example: the data's max_len or the task's default."""
        assert self.traits.default_max_len is not None, f"{self.name} has no examples to cut"
        return cfg.max_len or self.traits.default_max_len

    def reported(self, cfg: EvalConfig) -> tuple[str, ...]:
        """The metrics a stage of this task reports with evaluation `cfg`: what rules, `until` and
        the search may read."""
        if cfg.metrics is None:
            return self.traits.metrics
        kept = tuple(m for m in self.traits.metrics if m.removeprefix("val_") not in self.traits.decoded)
        return (*kept, *(f"val_{name}" for name in cfg.metrics))

    def check_metrics(self, cfg: EvalConfig, where: str) -> None:
        """`eval.metrics` names metrics this task can compute, each once."""
        selectable = self.traits.selectable
        for i, name in enumerate(cfg.metrics or ()):
            if name not in selectable:
                can = f"it can compute: {', '.join(selectable)}" if selectable else "it computes none"
                raise UserError(f"{where}.eval.metrics[{i}]", f"task {self.name} cannot compute '{name}' ({can})")
            if cfg.metrics.index(name) != i:  # type: ignore[union-attr]
                raise UserError(f"{where}.eval.metrics[{i}]", f"'{name}' is listed twice")

    def plan_corpus(self, cfg: DataConfig, plan_dir: Path, seed: int, template: ChatTemplate) -> Corpus | None:
        """The texts the plan's tokenizer is built from and its token streams hold, when this task
        is the first to read the plan's data and its files are not text (None: `field` is read as
        text, data.sources)."""
        return None

    def can_follow(self) -> list[str]:
        """The tasks whose model a stage of this task can train (its family), then those it can put
        a head on (heads_on_lm)."""
        family = self.traits.family
        own = [t.name for t in TASKS.values() if t.traits.family == family]
        heads = [t.name for t in TASKS.values()
                 if self.traits.heads_on_lm and t.traits.family == LM_FAMILY and t.name not in own]
        return own + heads

    def uses_lm_tokenizer(self, parent: StageSetup[Any] | None, plan: Plan) -> bool:
        """Whether the stage reads the plan's tokenizer (trains a causal LM or a head on one)."""
        return self.traits.family == LM_FAMILY

    def table_format(self, cfg: DataConfig, where: str) -> str | None:
        """The reader's format for the stage's files (None: told by their extensions)."""
        if cfg.format not in self.traits.formats:
            raise UserError(f"{where}.format", f"a {self.name} stage reads {self.traits.reads}: format "
                                               f"{' or '.join(self.traits.formats)} (got '{cfg.format}')")
        return {"auto": None, "json": "jsonl"}.get(cfg.format, cfg.format) if self.traits.table_files else None

    # --- preparing and training ---------------------------------------------------------------------

    @abstractmethod
    def prepare(self, inp: StageInput) -> tuple[D, str]:
        """The stage's data and its fingerprint; bad files are one-line UserErrors."""

    def n_train(self, data: D) -> int:
        """What a pass over the prepared training data holds: tokens or examples."""
        return len(data.train)  # type: ignore[attr-defined]

    def root_model(self, cfg: ModelConfig, data: D) -> nn.Module:
        """The plan's model for a first (or `from: init`) stage of this task."""
        raise UserError("model", f"a {self.name} stage cannot start from the plan's model")

    def head_model(self, lm: nn.Module, data: D, where: str) -> nn.Module:
        """A new model of this task on a causal LM's backbone (heads_on_lm)."""
        raise NotImplementedError

    def longest_example(self, data: D) -> int | None:
        """Tokens in the longest encoded example, for a task that feeds a causal LM's positions."""
        return None

    def labels(self, data: D) -> list[str] | None:
        """The classes (classify) or tags (tag) the model predicts, in id order."""
        return None

    @abstractmethod
    def bind(self, setup: StageSetup[D], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        """The training task over the stage's model and data."""


def task_spec(name: str, where: str = "task") -> TaskSpec[Any]:
    """The registered task `name` (config.registry)."""
    if name not in TASKS:
        raise UserError(where, f"unknown task '{name}' (tasks: {', '.join(TASKS)})")
    spec: TaskSpec[Any] = TASKS[name]
    return spec


S = TypeVar("S", bound=type[TaskSpec[Any]])


def register_task(spec: S) -> S:
    """Class decorator: add the task `spec` (an instance of it) to the registry under its `name`."""
    instance = spec()
    if not isinstance(instance, TaskCore) or not isinstance(getattr(spec, "traits", None), TaskTraits):
        raise TypeError(f"task {spec.__name__} needs a name, TaskTraits and prepare, root_model, bind (TaskCore)")
    TASKS[spec.name] = instance
    return spec
