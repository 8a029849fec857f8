"""The typed plan: what a plan file may say, checked before anything runs.

Every model rejects unknown keys. Settings that only some optimizers or schedules understand are
declared in the tables below; a setting given to one that does not use it is an error, and one
that is not given takes that optimizer's or schedule's default (`settings()`).
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stagewise.plan.base import MAX_STEPS, SEED_MAX, Name, NonNegativeFloat, Path_, PositiveFloat, Steps, Strict
from stagewise.plan.rules import GuardConfig, InjectConfig, OnPlateauConfig, RuleConfig, TaskName, UntilConfig
from stagewise.plan.track import AnyTracker, TensorBoardTracker, as_trackers


def _duration(value: Any) -> int | float:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEPS:
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise PydanticCustomError(
        "duration", "must be a step count (int >= 0) or a fraction of the stage in [0, 1]")


def _threads(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096):
        return value
    raise PydanticCustomError("threads", "must be a positive integer (at most 4096) or auto")


def _compile(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise PydanticCustomError("compile", "must be true, false or auto")


# A duration inside a stage: an int counts steps, a float in [0, 1] is a fraction of the stage.
Duration = Annotated[int | float, PlainValidator(_duration)]
Threads = Annotated[int | Literal["auto"], PlainValidator(_threads)]
Compile = Annotated[bool | Literal["auto"], PlainValidator(_compile)]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
StageName = Annotated[str, Field(pattern=_NAME, max_length=64)]
Column = Annotated[int, Field(ge=0, le=10**6)]  # a 0-based column index


def _only_settings_of(model: BaseModel, kind: str, table: dict[str, dict[str, Any]]) -> None:
    """Reject a setting given to an optimizer/schedule that does not use it."""
    allowed = table[model.name]  # type: ignore[attr-defined]
    for key in sorted(model.model_fields_set - {"name", "handoff"}):
        if key not in allowed:
            raise PydanticCustomError(
                "setting_error",
                "not a setting of {kind} '{name}' (it takes: {allowed})",
                {"key": key, "kind": kind, "name": model.name,  # type: ignore[attr-defined]
                 "allowed": ", ".join(sorted(allowed)) or "nothing"},
            )


ADAM = ("adam", "adamw")  # the optimizers whose steps SWATS reads and whose moment `convert` hands on

# Per-optimizer settings and their defaults (None: inherited/required, see plan.resolve).
OPTIMIZER_SETTINGS: dict[str, dict[str, Any]] = {
    "gd": {"lr": None, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "sgd": {"lr": None, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "sgd_l1": {"lr": None, "momentum": 0.0},
    "adam": {"lr": None, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": None, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    # betas/eps are for the AdamW that Muon uses on non-matrix parameters.
    "muon": {"lr": None, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1,
             "betas": (0.9, 0.95), "eps": 1e-8},
    # Schedule-free (optim.schedule_free): give them a constant schedule; momentum is SGD's averaging beta.
    "schedulefree_adamw": {"lr": None, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "schedulefree_sgd": {"lr": None, "momentum": 0.9, "weight_decay": 0.0},
}


class OptimizerConfig(Strict):
    """An optimizer. `name` omitted means the parent stage's optimizer; unset settings then come
    from the parent, and a different `name` starts from that optimizer's defaults."""

    name: Literal["gd", "sgd", "sgd_l1", "adam", "adamw", "muon", "schedulefree_adamw", "schedulefree_sgd"] | None = None
    # auto (adam/adamw -> sgd): the SWATS estimate of the LR that matches the parent's Adam steps
    lr: PositiveFloat | Literal["auto"] | None = None
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] | None = None
    eps: PositiveFloat | None = None
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    nesterov: bool | None = None
    weight_decay: NonNegativeFloat | None = None
    # The parent's optimizer state: `carry` keeps it (same optimizer), `convert` turns Adam's first
    # moment into SGD's momentum (adam/adamw -> sgd), `reset` starts fresh.
    handoff: Literal["carry", "reset", "convert"] = "reset"

    @model_validator(mode="after")
    def _settings_apply(self) -> OptimizerConfig:
        if self.name is not None:
            _only_settings_of(self, "optimizer", OPTIMIZER_SETTINGS)
        if self.nesterov and self.momentum == 0.0:
            raise PydanticCustomError("setting_error", "nesterov needs momentum > 0", {"key": "nesterov"})
        return self


# Per-schedule settings and their defaults (None: required).
_WARMUP = {"warmup": 0}
SCHEDULE_SETTINGS: dict[str, dict[str, Any]] = {
    "constant": {**_WARMUP},
    "step": {**_WARMUP, "step_size": None, "gamma": 0.1},
    "multistep": {**_WARMUP, "milestones": None, "gamma": 0.1},
    "exponential": {**_WARMUP, "gamma": None},
    "cosine": {**_WARMUP, "min_lr": 0.0},
    "decay": {**_WARMUP, "shape": "linear", "min_lr": 0.0},
    "wsd": {**_WARMUP, "decay": 0.2, "shape": "1-sqrt", "min_lr": 0.0},
    "onecycle": {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4, "anneal": "cos"},
    "stlr": {"cut_frac": 0.1, "ratio": 32.0},
    # ReduceLROnPlateau (threshold_mode abs): plan.resolve turns it into `constant` + an
    # `on_plateau` lr_scale rule, so there is one plateau mechanism (engine.control).
    "plateau": {**_WARMUP, "factor": 0.1, "patience": 2, "threshold": 0.0, "min_lr": 0.0},
}
ScheduleName = Literal["constant", "step", "multistep", "exponential", "cosine", "decay", "wsd",
                       "onecycle", "stlr", "plateau"]


class ScheduleConfig(Strict):
    """A learning-rate schedule over one stage, as a multiple of the stage's peak LR.

    `warmup_<name>` is accepted as `<name>` with a required `warmup`.
    """

    name: ScheduleName = "constant"
    warmup: Duration | None = None
    step_size: Duration | None = None
    milestones: Annotated[list[Duration], Field(max_length=1000)] | None = None
    gamma: PositiveFloat | None = None
    min_lr: NonNegativeFloat | None = None
    decay: Duration | None = None
    shape: Literal["linear", "cosine", "1-sqrt"] | None = None
    pct_start: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    div_factor: PositiveFloat | None = None
    final_div_factor: PositiveFloat | None = None
    anneal: Literal["cos", "linear"] | None = None
    cut_frac: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    ratio: Annotated[float, Field(ge=1.0)] | None = None
    factor: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    patience: Annotated[int, Field(ge=0, le=MAX_STEPS)] | None = None
    threshold: NonNegativeFloat | None = None

    @model_validator(mode="before")
    @classmethod
    def _warmup_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and str(data.get("name", "")).startswith("warmup_"):
            data = {**data, "name": data["name"].removeprefix("warmup_")}
            if "warmup" not in data:
                raise PydanticCustomError(
                    "setting_error", "required by a warmup_* schedule", {"key": "warmup"})
        return data

    @model_validator(mode="after")
    def _settings_apply(self) -> ScheduleConfig:
        _only_settings_of(self, "schedule", SCHEDULE_SETTINGS)
        for key, default in SCHEDULE_SETTINGS[self.name].items():
            if default is None and getattr(self, key) is None:
                raise PydanticCustomError(
                    "setting_error", "required by schedule '{name}'", {"key": key, "name": self.name})
        return self

    def settings(self) -> dict[str, Any]:
        """This schedule's settings, defaults filled in."""
        return {k: (d if getattr(self, k) is None else getattr(self, k))
                for k, d in SCHEDULE_SETTINGS[self.name].items()}


class RegularizationConfig(Strict):
    """Per stage; not inherited (use `defaults:` to share). `l1`/`l2` are added to the loss over
    weight matrices; with `sgd_l1` the L1 term is applied by its proximal step instead."""

    l1: NonNegativeFloat = 0.0
    l2: NonNegativeFloat = 0.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None  # None: the model's own
    grad_clip: PositiveFloat | None = None


class RampConfig(Strict):
    """A batch that grows over the stage (optim.batch_ramp), by accumulating more micro-batches:
    from size x accumulate sequences to `to` (rounded down to whole micro-batches) over `over`
    (steps, or a fraction of the stage), `linear` or in `steps` of `increment` sequences
    (Megatron-LM's rampup); the LR optionally scaled with the batch (relative to the start batch)."""

    to: Annotated[int, Field(ge=1, le=10**7)]
    over: Duration
    shape: Literal["linear", "steps"] = "linear"
    increment: Annotated[int, Field(ge=1, le=10**7)] | None = None  # steps: sequences each step adds
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"

    @model_validator(mode="after")
    def _increment_with_steps(self) -> RampConfig:
        if (self.shape == "steps") != (self.increment is not None):
            raise PydanticCustomError("setting_error", "required by shape: steps and only by it", {"key": "increment"})
        if self.over == 0:
            raise PydanticCustomError("setting_error", "must be > 0 (a ramp over no steps is batch.size)",
                                      {"key": "over"})
        return self


class DumpsAsBefore(Strict):
    """A config that gained keys after stage keys were first written: each of `LATER`, while None,
    stays out of the dump, so the data settings and stage keys of existing plans dump (and hash)
    as before. (StageConfig's own later keys are left out of its key in plan.resolve.)"""

    LATER: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_unset_later(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        for key in self.LATER:
            if getattr(self, key) is None:
                dumped.pop(key, None)
        return dumped


class BatchConfig(DumpsAsBefore):
    LATER = ("ramp",)
    size: Annotated[int, Field(ge=1, le=10**6)]  # sequences per micro-batch
    accumulate: Annotated[int, Field(ge=1, le=10**5)] = 1  # micro-batches per update
    full: bool = False  # one update per pass over the whole training set
    block_size: Annotated[int, Field(ge=2, le=2**20)] | None = None  # None: the model's context length
    ramp: RampConfig | None = None  # None: the same batch every update

    @model_validator(mode="after")
    def _full_excludes_accumulate(self) -> BatchConfig:
        if self.full and "accumulate" in self.model_fields_set:
            raise PydanticCustomError(
                "setting_error", "not used with full: true (the whole set is accumulated)",
                {"key": "accumulate"})
        if self.full and self.ramp is not None:
            raise PydanticCustomError(
                "setting_error", "not used with full: true (every update is the whole set)", {"key": "ramp"})
        if self.ramp is not None:
            start, size = self.size * self.accumulate, self.size
            if self.ramp.to // size * size <= start:
                got = f"{self.ramp.to}" + (f", {self.ramp.to // size * size} in whole micro-batches of {size}"
                                           if self.ramp.to % size else "")
                raise PydanticCustomError("setting_error", "must be > the start batch size x accumulate = {start} "
                                          "(got {got})", {"key": ["ramp", "to"], "start": start, "got": got})
            if self.ramp.increment is not None:
                if self.ramp.increment % size:
                    raise PydanticCustomError("setting_error", "must be a multiple of size {size} (whole micro-batches;"
                                              " got {inc})", {"key": ["ramp", "increment"], "size": size,
                                                              "inc": self.ramp.increment})
                if (self.ramp.to - start) % self.ramp.increment:
                    raise PydanticCustomError("setting_error", "to - size x accumulate = {span} must be a multiple of "
                                              "increment {inc}", {"key": ["ramp", "increment"],
                                                                  "span": self.ramp.to - start,
                                                                  "inc": self.ramp.increment})
        return self



class AverageConfig(Strict):
    """Weight averaging during the stage (optim.average): `ema` is the decay of an exponential
    moving average of the weights, updated after every update; evaluations use it, and the stage
    ends on it (its children and export take the averaged weights)."""

    ema: Annotated[float, Field(gt=0.0, lt=1.0)]


class MergeConfig(Strict):
    """A stage that trains nothing: its weights are the average of its parent's checkpoints
    (checkpoint merging instead of a decay, WSM; a model soup of one run's checkpoints). `last`:
    the parent's last K checkpoints at the plan's `checkpoint.every`, its end included; or `from`
    .. `to`: those in that range of the parent's steps. `weights`: uniform, or linear (the i-th
    oldest of K weighs i). The parent saves those steps and keeps them (as a branch's `@STEP`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)
    last: Annotated[int, Field(ge=2, le=10_000)] | None = None
    from_: Steps | None = Field(None, alias="from")
    to: Steps | None = None
    weights: Literal["uniform", "linear"] = "uniform"

    @model_validator(mode="after")
    def _last_or_range(self) -> MergeConfig:
        if (self.last is None) == (self.from_ is None and self.to is None):
            raise PydanticCustomError("setting_error", "give last, or from and to", {"key": "last"})
        if self.last is None and (self.from_ is None or self.to is None or self.from_ >= self.to):
            raise PydanticCustomError("setting_error", "a range of the parent's steps: from < to", {"key": "to"})
        return self


# What a merge stage does not take: it trains nothing, and evaluates as its parent does (the
# parent's task and data, plan.tree); `defaults:` give it only MERGE_DEFAULTS (plan.load).
MERGE_REFUSES = ("task", "data", "adapter", "layers", "optimizer", "schedule", "regularization", "steps", "epochs",
                 "tokens", "until", "rules", "on_plateau", "guard", "inject", "end", "average", "allow_nonfinite")
MERGE_DEFAULTS = ("batch", "eval")


class EvalConfig(Strict):
    """Validation runs at the end of every stage, and also every N steps / each epoch.
    `batches` limits causal_lm's validation windows; the fine-tuning tasks evaluate every
    validation example. `beam`: seq2seq's decoding for BLEU / chrF (1: greedy)."""

    every: Steps | None = None
    each_epoch: bool = False
    batches: Annotated[int, Field(ge=1, le=10**7)] | Literal["all"] = 50
    beam: Annotated[int, Field(ge=1, le=16)] = 1
    # The metrics of decoded outputs to compute (without `val_`: rouge1, exact_match, ...), instead
    # of the task's own; what each task can compute is its spec's (tasks.spec). sft decodes the
    # first `batches` x batch.size validation prompts for them.
    metrics: Annotated[list[Name], Field(min_length=1, max_length=64)] | None = None


class LayersConfig(Strict):
    """Which parameters train, and how fast (optim.layers). `freeze`: glob patterns of parameter
    names that get no gradient in this stage. `unfreeze: gradual`: ULMFiT's schedule, the top
    layer group in the first epoch and one more group each epoch. `lr_factor`: discriminative
    LRs, each layer group below the top one learns `lr_factor` times slower (ULMFiT: 2.6)."""

    freeze: Annotated[list[Name], Field(max_length=256)] = []
    unfreeze: Literal["all", "gradual"] = "all"
    lr_factor: Annotated[float, Field(ge=1.0)] = 1.0


class MixSource(Strict):
    """One source of a stage's data mixture: its files (as `train` / `val` of a stage's data) and
    its share of the sequences drawn; `name` (default: the train file's stem) names its
    validation loss, `val_loss/<name>`."""

    name: StageName | None = None
    train: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)]
    val: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)] | None = None
    weight: NonNegativeFloat

    def label(self, index: int) -> str:
        if self.name is not None:
            return self.name
        first = self.train if isinstance(self.train, str) else self.train[0]
        return PurePath(first).stem or f"source{index}"


class DataConfig(DumpsAsBefore):
    """Local files (paths or globs, relative to the plan file; `{stdlib}` is the running Python's
    standard library directory) or `hub:NAME[:CONFIG]` for a datasets hub name; or, for a
    causal_lm stage, `mix`: a weighted mixture of such sources (data.mixture)."""

    LATER = ("mix",)
    train: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)] | None = None
    mix: Annotated[list[MixSource], Field(min_length=1, max_length=64)] | None = None
    val: Path_ | Annotated[list[Path_], Field(min_length=1, max_length=10_000)] | None = None
    # Without `val`: held out of a table as rows drawn by the plan's seed (the same rows for
    # every task that reads the table), of text files as their last characters (nanoGPT).
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    # Columns: a name, or a 0-based index for a csv/tsv file without a header row (or JSON Lines of arrays).
    field: Name | Column = "text"  # the text (causal_lm, classify)
    label: Name | Column | None = None  # classify: the label column (default "label")
    source: Name | Column | None = None  # seq2seq: the source column (default "source")
    target: Name | Column | None = None  # seq2seq: the target column (default "target")
    format: Literal["auto", "text", "json", "csv", "tsv", "parquet"] = "auto"
    max_len: Annotated[int, Field(ge=2, le=2**20)] | None = None  # fine-tuning tasks: tokens per example (cut)
    pack: bool = False  # sft: pack several examples into one row

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
                if not re.fullmatch(_NAME, name):
                    raise PydanticCustomError("setting_error", "'{name}' (the train file's stem) cannot name the source's"
                                              " val_loss: give it a name", {"key": ["mix", i, "name"], "name": name})
                if names.index(name) != i:
                    raise PydanticCustomError("setting_error", "'{name}' names mix[{first}] already: give the "
                                              "sources distinct names", {"key": ["mix", i, "name"], "name": name,
                                                                        "first": names.index(name)})
        return self



class LoraSettings(Strict):
    """A LoRA adapter (peft's LoraConfig): rank `r`, scale `alpha / r`, dropout on its input, and
    the modules it adapts (names or "all-linear"; unset: peft's default for the architecture)."""

    r: Annotated[int, Field(ge=1, le=4096)] = 8
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    target_modules: Annotated[list[Name], Field(min_length=1, max_length=256)] | Literal["all-linear"] | None = None


class AdapterConfig(Strict):
    """A stage that trains an adapter on its parent's model, the base weights frozen
    (models.adapters). `from_parent`, when the parent stage has an adapter too: `keep` trains that
    adapter on (its settings; `lora` may be left out), `merge` folds it into the weights and starts
    this stage's, `new` leaves it out (the parent's base weights) and starts this stage's."""

    lora: LoraSettings | None = None
    from_parent: Literal["keep", "merge", "new"] = "keep"


class StageConfig(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)
    name: StageName
    # The parent: `NAME` (its end) or `NAME@STEP` (its checkpoint at that step); default: the
    # previous stage. A plan with branches is a tree.
    # `init`: the model as built, before any stage (a second root, e.g. a baseline to compare with).
    from_: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(@[0-9]+)?$",
                                     max_length=100)] | None = Field(None, alias="from")
    task: TaskName = "causal_lm"
    data: DataConfig | None = None  # None: the plan's `data`
    adapter: AdapterConfig | None = None  # None: the stage trains the model's own weights
    layers: LayersConfig = LayersConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    batch: BatchConfig
    steps: Steps | None = None
    epochs: Annotated[int, Field(ge=1, le=10**6)] | None = None
    tokens: Annotated[int, Field(ge=1, le=10**15)] | None = None
    eval: EvalConfig = EvalConfig()
    until: UntilConfig | None = None
    rules: Annotated[list[RuleConfig], Field(max_length=64)] = []
    on_plateau: OnPlateauConfig | None = None
    guard: GuardConfig | None = None
    inject: Annotated[list[InjectConfig], Field(max_length=64)] = []
    # best: the stage ends on (and hands on, and exports) the weights of its best evaluation, by
    # val_loss or the metric its `until` / `on_plateau` names; last: those of its last update.
    end: Literal["best", "last"] = "last"
    average: AverageConfig | None = None
    merge: MergeConfig | None = None  # a stage of averaged parent checkpoints, trained nothing
    # A non-finite loss or gradient norm stops a stage without a guard; true: train on (the
    # stage's end is still checked: non-finite weights or metrics are never saved as complete).
    allow_nonfinite: bool = False

    def all_rules(self) -> list[RuleConfig]:
        """`on_plateau` first, then `rules`, in the order they are checked."""
        return ([self.on_plateau.rule()] if self.on_plateau is not None else []) + list(self.rules)

    @model_validator(mode="after")
    def _one_duration(self) -> StageConfig:
        if self.merge is not None:
            for key in MERGE_REFUSES:
                if key in self.model_fields_set:
                    raise PydanticCustomError(
                        "setting_error", "not for a merge stage (it trains nothing: it averages its parent's "
                        "checkpoints, evaluated with the parent's task and data)", {"key": key})
            return self
        given = [k for k in ("steps", "epochs", "tokens") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "setting_error", "give exactly one of steps, epochs, tokens (got {got})",
                {"key": "steps", "got": ", ".join(given) or "none"})
        return self


class ModelConfig(BaseModel):
    """`arch` (a task's built-in model, e.g. `gpt` (models.gpt), or a transformers model type,
    built from config with the other keys as its config fields) or `pretrained` (a local directory
    or hub name). Size keys are checked against the model's constructor or the architecture's
    config class (models.keys)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    arch: Annotated[str, Field(max_length=64)] | None = None
    pretrained: Path_ | None = None
    # auto: eager when the plan compiles on CPU (inductor fuses it; SDPA's CPU kernels are opaque
    # to it and their backward is slow: 1.9x slower steps for a 4x256 GPT-2), else the model's own.
    attention: Literal["auto", "eager", "sdpa"] = "auto"

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
    # word: a word-level vocabulary of the training texts (the built-in bigru / transformer
    # models of the fine-tuning tasks); the others are for transformers models.
    kind: Literal["char", "byte", "bpe", "word", "pretrained"]
    vocab_size: Annotated[int, Field(ge=257, le=2**22)] | None = None  # bpe, word (default 10000)
    path: Path_ | None = None  # pretrained only: a directory or hub name

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
    max_tokens: Annotated[int, Field(ge=1, le=10**5)] = 200
    temperature: Annotated[float, Field(ge=0.0)] = 0.8
    top_k: Annotated[int, Field(ge=1, le=10**7)] | None = None
    # texts that end it (besides EOS and the end marker)
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=1000)]], Field(max_length=64)] = []


class CheckpointConfig(Strict):
    """Mid-stage checkpoints (each stage's end is always saved): every N steps and/or every M
    minutes; the newest `keep` are kept, plus every stage's final one and those branches start from."""

    every: Steps | None = None
    minutes: PositiveFloat | None = None
    keep: Annotated[int, Field(ge=1, le=10_000)] = 3


class LogConfig(Strict):
    every: Steps = 10  # steps between metrics lines


class DistributedConfig(Strict):
    """How the processes of a torchrun launch share a stage (engine.distributed): `ddp` replicates
    the model and all-reduces gradients; `fsdp` shards weights, gradients and optimizer state
    (FSDP2, engine.sharded)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"


class Plan(Strict):
    name: StageName
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 0
    device: Annotated[str, Field(max_length=32)] = "auto"  # auto | cpu | cuda | cuda:N
    # auto: what runs faster on the device for this plan (engine.device; README "What auto picks")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Compile = "auto"
    threads: Threads = "auto"  # CPU threads for torch (torch.set_num_threads)
    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    stages: Annotated[list[StageConfig], Field(min_length=1, max_length=1000)]
    sample: SampleConfig | None = None
    # How conversations become text (tasks.chat): a Jinja string, a file, or `pretrained` (the
    # pretrained tokenizer's own); unset: the built-in template.
    chat_template: Annotated[str, Field(min_length=1)] | None = None
    log: LogConfig = LogConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    # Experiment trackers (plan.track); a list replaces the default, [] writes none.
    track: Annotated[list[AnyTracker], BeforeValidator(as_trackers), Field(max_length=8)] = [TensorBoardTracker()]

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
