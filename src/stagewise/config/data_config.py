"""What data a plan or a stage reads: files, columns, a mixture of sources."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.fields import NAME_PATTERN, Column, DumpsAsBefore, Name, NonNegativeFloat, Path_, StageName, Strict, Threads


class MixSource(Strict):
    """One source of a stage's data mixture: its files (as `train` / `val` of a stage's data) and
    its share of the sequences drawn; `name` (default: the train file's stem) names its
    validation loss, `val_loss/<name>`."""

    name: StageName | None = None
    """Names the source's validation loss, `val_loss/<name>`; default: the train file's stem."""
    train: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)]
    """The source's training files (paths or globs, relative to the plan)."""
    val: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)] | None = None
    """The source's validation files; unset: held out of its training files by val_fraction."""
    weight: NonNegativeFloat
    """The source's share of the sequences drawn (weights need not sum to 1)."""

    def label(self, index: int) -> str:
        if self.name is not None:
            return self.name
        first = self.train if isinstance(self.train, str) else self.train[0]
        return PurePath(first).stem or f"source{index}"


class DataConfig(DumpsAsBefore):
    """Local files (paths or globs, relative to the plan file; `{stdlib}` is the running Python's
    standard library directory) or `hub:NAME[:CONFIG]` for a datasets hub name; or, for a
    causal_lm stage, `mix`: a weighted mixture of such sources (data.mixture)."""

    LATER = ("mix", "dtype")
    train: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)] | None = None
    """Training files: paths or globs relative to the plan file (`{stdlib}`: the running Python's standard library),
    or `hub:NAME[:CONFIG]`."""
    mix: Annotated[list[MixSource], Field(min_length=1, max_length=64)] | None = None
    """causal_lm stages only: a weighted mixture of sources instead of `train` (never the plan's own data)."""
    val: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)] | None = None
    """Validation files; unset: held out of the training data by val_fraction."""
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    """Without `val`: the share held out, as rows of a table drawn by the plan's seed (the same rows for every task
    that reads the table), or the last characters of text files (nanoGPT's split)."""
    field: Name | Column = "text"
    """The text column (causal_lm, classify): a name, or a 0-based index for a csv/tsv without header or JSON Lines
    of arrays."""
    label: Name | Column | None = None
    """classify: the label column (name or 0-based index; default `label`)."""
    source: Name | Column | None = None
    """seq2seq: the source column (name or 0-based index; default `source`)."""
    target: Name | Column | None = None
    """seq2seq: the target column (name or 0-based index; default `target`)."""
    format: Literal["auto", "text", "json", "csv", "tsv", "parquet", "tokens"] = "auto"
    """How the files are read; `auto`: by extension (`.bin` and `.npy` are tokens: ids already made)."""
    dtype: Literal["uint16", "uint32"] = "uint16"
    """tokens: the type of the ids in `.bin` files (nanoGPT's: uint16); a `.npy` file states its own."""
    max_len: Annotated[int, Field(ge=2, le=2**20)] | None = None
    """Fine-tuning tasks: tokens per example (longer ones are cut)."""
    pack: bool = False
    """sft: pack several examples into one row."""
    # exclude: how many processes encode does not change the ids, so it is in no dump, key or fingerprint.
    num_proc: Threads = Field("auto", exclude=True)
    """Processes that encode the text into token ids (the ids are the same for any count); `auto`: the cores
    `threads: auto` starts from (OMP_NUM_THREADS when set, else the physical cores)."""

    @model_validator(mode="after")
    def _train_or_mix(self) -> DataConfig:
        if (self.train is None) == (self.mix is None):
            raise PydanticCustomError("setting_error", "give exactly one of train, mix", {"key": "train"})
        if self.mix is not None:
            if self.val is not None:
                raise PydanticCustomError("setting_error", "a mix gives each source its own val", {"key": "val"})
            if sum(s.weight for s in self.mix) <= 0.0:
                raise PydanticCustomError("setting_error", "the weights sum to 0: give a source a weight > 0",
                                          {"key": "mix"})
            names = [s.label(i) for i, s in enumerate(self.mix)]
            for i, name in enumerate(names):
                if not re.fullmatch(NAME_PATTERN, name):
                    raise PydanticCustomError("setting_error", "'{name}' (the train file's stem) cannot name the source's"
                                              " val_loss: give it a name", {"key": ["mix", i, "name"], "name": name})
                if names.index(name) != i:
                    raise PydanticCustomError("setting_error", "'{name}' names mix[{first}] already: give the "
                                              "sources distinct names", {"key": ["mix", i, "name"], "name": name,
                                                                        "first": names.index(name)})
        return self
