"""What the rest of stagewise reads of a task besides its work: its traits, one frozen record
(the plan's checks, the engine and the trained-run commands read it; nothing outside `tasks/`
compares task names), and the capabilities a task may have beyond the required core of
tasks.spec.TaskSpec (prepare the data, build the model, bind the loss): saving an export,
generating from one, evaluating a file with one. Callers ask for a capability with isinstance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from stagewise.config.plan_config import ModelConfig
    from stagewise.tasks.export import TrainedStage
    from stagewise.tasks.spec import GenerateOptions, StageSetup


@dataclass(frozen=True)
class TaskTraits:
    # Tasks of one family train the same model, one after the other (causal_lm and sft: a causal LM).
    family: str
    metrics: tuple[str, ...]  # what it reports unless `eval.metrics` says otherwise
    data_keys: frozenset[str]  # of tasks.spec.TASK_DATA_KEYS, those it reads
    reads: str  # its files, for messages
    # The kind of model the archs stagewise builds for it are (config.registry.ARCHS): causal_lm,
    # classify, tag, seq2seq; None: its family's name.
    arch_kind: str | None = None
    unit: str = "examples"  # what a stage's size counts: "tokens" or "examples"
    heads_on_lm: bool = False  # can put a new head on a causal LM (classify: ULMFiT)
    samples: bool = False  # the plan's `sample` continues a prompt with its model
    # What `eval.metrics` may select (without `val_`), in place of the task's own scores of
    # decoded outputs (`decoded`: those of `metrics` it replaces).
    selectable: tuple[str, ...] = ()
    decoded: tuple[str, ...] = ()
    takes_adapters: bool = False  # its stages may train an adapter (models.adapters)
    mixes: bool = False  # its stages may read a weighted mix of sources (data.mixture)
    formats: tuple[str, ...] = ("auto",)  # the data.format values it reads
    table_files: bool = False  # reads csv/tsv/jsonl tables (data.format, evaluate --format)
    default_max_len: int | None = None  # tokens (tag: words) per example
    counts: str = "examples"  # what `evaluate` counts
    label_kind: str = "label"  # what its labels are called in messages (tag: "tag")
    beam_search: bool = False  # decodes with a beam (eval.beam, --beam)

    @property
    def model_kind(self) -> str:
        """The kind its stagewise-built models are registered as (config.registry.register_arch)."""
        return self.arch_kind or self.family


@runtime_checkable
class Exports(Protocol):
    """Saves a stage's final model as a directory usable without the plan (tasks.export)."""

    def save(self, setup: StageSetup[Any], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
        ...


@runtime_checkable
class Generates(Protocol):
    """Makes something of a prompt with an exported stage (`stagewise generate`)."""

    def generate(self, stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str: ...


@runtime_checkable
class EvaluatesFiles(Protocol):
    """Scores an exported stage on a file like the stage's own (`stagewise evaluate`): the task's
    validation metrics, and how many `traits.counts` were scored."""

    def evaluate_file(self, stage: TrainedStage, path: Path, fmt: str | None, beam: int) -> tuple[dict[str, Any], int]:
        ...
