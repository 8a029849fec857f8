"""A stage's final model as a directory (`RUN/stages/NAME/`) usable without stagewise's plan, and
reading it back: both sides of the format in one place.

- transformers models through `save_pretrained` (AutoModel* and AutoTokenizer load it as it is; a
  classifier's config names its labels);
- the built-in models (bigru, transformer) as `model.safetensors` + `model.json` (task, arch,
  settings, sizes, labels) + their word tokenizers (`tokenizers` JSON files).

`stagewise.json`, written last by the engine, marks an export complete and names its task; each
task's spec (config.registry) says what its directory holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer
from torch import nn

from stagewise.config.data_config import DataConfig
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.models import builtin_model
from stagewise.tasks.vocab import PAD, UNK

if TYPE_CHECKING:
    from stagewise.tasks.spec import TaskSpec

MARKER = "stagewise.json"
BUILTIN_FILE = "model.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class TrainedStage:
    """A finished stage: its export and what the run's plan says about its data."""

    directory: Path
    spec: TaskSpec
    labels: LabelMap | None  # classify: the classes; tag: the tags
    data: DataConfig  # the stage's own data, or the plan's
    batch_size: int  # what its validation was evaluated in
    beam: int  # seq2seq: the decoding of its validation BLEU / chrF
    metrics: tuple[str, ...] = ()  # its `eval.metrics`: the text metrics it computes instead of the task's own

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def max_len(self) -> int:
        return self.spec.max_len(self.data)

    @property
    def is_transformers(self) -> bool:
        return (self.directory / "config.json").is_file()

    def tokenizer(self, name: str = "tokenizer.json") -> Tokenizer:
        """A saved `tokenizers` tokenizer: the tasks' encoders take these, not transformers' wrappers."""
        return Tokenizer.from_file(str(self.directory / name))

    def builtin(self) -> tuple[nn.Module, dict[str, Any]]:
        """A built-in model rebuilt as its task built it, with the stage's weights; and its model.json."""
        from safetensors.torch import load_model

        description = json.loads((self.directory / BUILTIN_FILE).read_text(encoding="utf-8"))
        model = builtin_model(description["arch"], description["task"], description["sizes"], description["settings"])
        load_model(model, str(self.directory / WEIGHTS))
        return model.eval(), description


def load_transformers(directory: Path, auto: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of a transformers export, as the Auto classes load them."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of output is the point of these commands
    model = auto.from_pretrained(directory)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def save_transformers(model: Any, labels: list[str] | None, tokenizer: Any | None, out: Path) -> None:
    """A transformers model and its tokenizer (a PreTrainedTokenizerFast; None: the caller writes
    it); a classifier's or tagger's labels named in its config."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars would interleave with ours
    out.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def save_builtin(model: nn.Module, description: dict[str, Any], tokenizers: dict[str, Tokenizer], out: Path) -> None:
    """A built-in model: its weights, model.json (task, arch, settings, sizes, labels, ...) and
    its word tokenizers by file name."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS))
    for name, tok in tokenizers.items():
        tok.save(str(out / name))
    (out / BUILTIN_FILE).write_text(json.dumps(description, indent=1))


def auto_tokenizer(tok: Tokenizer, **special: str) -> Any:
    """A word vocabulary (tasks.vocab) as AutoTokenizer loads it: padding, unknown words and the
    given special tokens declared."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, **special)
