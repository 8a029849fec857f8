"""The typed plan: what a plan file may say, checked before anything runs. Every model rejects
unknown keys; a stage's parts are config.stage_config's, its data config.data_config's, its
optimizer and schedule config.optimizer_config's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, PlainValidator, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.data_config import DataConfig
from stagewise.config.fields import SEED_MAX, DumpsAsBefore, Path_, PositiveFloat, StageName, Steps, Strict
from stagewise.config.stage_config import StageConfig
from stagewise.config.track_config import DEFAULT_TRACK, Track


def _threads(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096):
        return value
    raise PydanticCustomError("threads", "must be a positive integer (at most 4096) or auto")


def _compile(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise PydanticCustomError("compile", "must be true, false or auto")
Threads = Annotated[int | Literal["auto"], PlainValidator(_threads)]
Compile = Annotated[bool | Literal["auto"], PlainValidator(_compile)]


class ArchSettings(Strict):
    """The settings of a model architecture stagewise builds (config.registry.register_arch): each
    field a key the plan's `model` may give, with the architecture's default."""


class ModelConfig(DumpsAsBefore):
    """`arch` (a task's built-in model, e.g. `gpt` (models.gpt), or a transformers model type,
    built from config with the other keys as its config fields) or `pretrained` (a local directory
    or hub name). Size keys are checked against the model's constructor or the architecture's
    config class (plan.model_keys)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)
    arch: Annotated[str, Field(max_length=64)] | None = None
    """A task's built-in model (`gpt`, `bigru`, `transformer`) or a transformers model type built from config, with
    the model's other keys as its config fields."""
    pretrained: Path_ | None = None
    """A local directory or hub name of a pretrained model."""
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    """`auto`: SDPA on CUDA; on CPU eager when the plan compiles (inductor fuses it; SDPA's CPU kernels are opaque to
    it, 1.9x slower steps for a 4x256 GPT-2), else the model's own."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (less memory, ~1/3 more
    compute); the same losses and gradients, so not part of a stage's key."""
    liger: bool = False
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy) on the transformers models it supports: CUDA
    only, the `stagewise[liger]` extra."""
    LATER = ("activation_checkpointing", "liger")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.arch is None) == (self.pretrained is None):
            raise PydanticCustomError("setting_error", "give exactly one of arch, pretrained", {"key": "arch"})
        if self.pretrained is not None and self.model_extra:
            key = sorted(self.model_extra)[0]
            raise PydanticCustomError(
                "setting_error", "size keys go with arch, not pretrained", {"key": key})
        return self

    def size_keys(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TokenizerConfig(Strict):
    kind: Literal["char", "byte", "bpe", "word", "pretrained"]
    """char, byte, bpe (trained, with vocab_size), word (a word vocabulary for the built-in bigru / transformer
    models) or pretrained (with path)."""
    vocab_size: Annotated[int, Field(ge=257, le=2**22)] | None = None
    """bpe, word: the vocabulary size (word's default: 10000)."""
    path: Path_ | None = None
    """pretrained: a directory or hub name."""

    @model_validator(mode="after")
    def _kind_settings(self) -> TokenizerConfig:
        if self.kind == "bpe" and self.vocab_size is None:
            raise PydanticCustomError("setting_error", "required by kind 'bpe'", {"key": "vocab_size"})
        if self.kind not in ("bpe", "word") and self.vocab_size is not None:
            raise PydanticCustomError("setting_error", "only for kinds 'bpe' and 'word'", {"key": "vocab_size"})
        if (self.kind == "pretrained") != (self.path is not None):
            raise PydanticCustomError("setting_error", "required by kind 'pretrained' and only by it", {"key": "path"})
        return self


class SampleConfig(Strict):
    """A short generation printed after training."""

    prompt: Annotated[str, Field(max_length=10_000)] = ""
    """The text generation starts from."""
    max_tokens: Annotated[int, Field(ge=1, le=10**5)] = 200
    """Tokens to generate."""
    temperature: Annotated[float, Field(ge=0.0)] = 0.8
    """Sampling temperature (0: greedy)."""
    top_k: Annotated[int, Field(ge=1, le=10**7)] | None = None
    """Sample among the k most likely tokens only."""
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=1000)]], Field(max_length=64)] = []
    """Texts that end the generation (besides EOS and the chat template's end marker)."""


class CheckpointConfig(Strict):
    """Mid-stage checkpoints (each stage's end is always saved): every N steps and/or every M
    minutes; the newest `keep` are kept, plus every stage's final one and those branches start from."""

    every: Steps | None = None
    """Save a mid-stage checkpoint every N steps (each stage's end is always saved)."""
    minutes: PositiveFloat | None = None
    """Save a mid-stage checkpoint every M minutes."""
    keep: Annotated[int, Field(ge=1, le=10_000)] = 3
    """Mid-stage checkpoints kept per stage (besides the final one and those branches start from)."""


class LogConfig(Strict):
    every: Steps = 10
    """Steps between metrics lines."""


class DistributedConfig(Strict):
    """How the processes of a torchrun launch share a stage (engine.distributed): `ddp` replicates
    the model and all-reduces gradients; `fsdp` shards weights, gradients and optimizer state
    (FSDP2, engine.sharded)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp` replicates the model and all-reduces gradients; `fsdp` shards weights, gradients and optimizer state
    (FSDP2)."""


class Plan(Strict):
    name: StageName
    """The plan's name: the default run directory is runs/<name>."""
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 0
    """Seeds the model's initialisation, the data order (with each stage's name) and every RNG."""
    device: Annotated[str, Field(max_length=32)] = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: what runs faster on the device for this plan; `bf16` is autocast. Part of every stage's key."""
    compile: Compile = "auto"
    """torch.compile the causal LM: `auto` when the run is long enough to earn the compile time back."""
    threads: Threads = "auto"
    """CPU threads for torch (torch.set_num_threads), 1 to 4096; `auto`: the cores this process may use."""
    model: ModelConfig
    """The model: `arch` (built from config) or `pretrained`; other keys are the architecture's config fields."""
    tokenizer: TokenizerConfig
    """The tokenizer, trained on the plan's data unless pretrained."""
    data: DataConfig
    """The data every stage reads unless it has its own; it also trains the tokenizer."""
    stages: Annotated[list[StageConfig], Field(min_length=1, max_length=1000)]
    """The stages, in order; `defaults` (a plan-level key merged into every stage, the stage's own keys winning) is
    applied before this schema."""
    sample: SampleConfig | None = None
    """A short generation printed and saved (sample.txt) after training."""
    chat_template: Annotated[str, Field(min_length=1)] | None = None
    """How conversations become text: a Jinja string, a file, or `pretrained` (the pretrained tokenizer's own);
    unset: the built-in template."""
    log: LogConfig = LogConfig()
    """How often metrics lines are written."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Mid-stage checkpoints."""
    distributed: DistributedConfig = DistributedConfig()
    """How the processes of a torchrun launch share a stage."""
    track: Track = DEFAULT_TRACK
    """Experiment trackers: each a name or `{name: {settings}}` (tensorboard, wandb, mlflow, trackio); a list
    replaces the default `[tensorboard]`, `[]` writes none."""

    @model_validator(mode="after")
    def _plan_data_not_a_mix(self) -> Plan:
        if self.data.mix is not None:
            raise PydanticCustomError("setting_error", "the plan's data trains the tokenizer: a mix goes in a "
                                      "stage's data", {"key": ["data", "mix"]})
        return self

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Plan:
        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if stage.name == "init":
                raise PydanticCustomError("setting_error", "'init' is reserved (from: init is the model as built)",
                                          {"key": ["stages", i, "name"]})
            if stage.name in seen:
                raise PydanticCustomError(
                    "setting_error", "'{name}' is already the name of stages[{first}]",
                    {"key": ["stages", i, "name"], "name": stage.name, "first": seen[stage.name]})
            seen[stage.name] = i
        return self
