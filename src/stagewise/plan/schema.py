"""The typed plan: what a plan file may say, checked before anything runs.

Every model rejects unknown keys. Settings that only some optimizers or schedules understand are
declared in the tables below; a setting given to one that does not use it is an error, and one
that is not given takes that optimizer's or schedule's default (`settings()`).
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from stagewise.plan.base import MAX_STEPS, SEED_MAX, Name, NonNegativeFloat, Path_, PositiveFloat, Steps, Strict
from stagewise.plan.rules import GuardConfig, InjectConfig, OnPlateauConfig, RuleConfig, TaskName, UntilConfig


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
    """The optimizer. Unset: the parent stage's optimizer and its settings; a different name starts from that
    optimizer's defaults."""
    lr: PositiveFloat | Literal["auto"] | None = None
    """Peak learning rate. Unset: continues from the LR the parent ends on (its real one where only the run knows
    it: after `auto`). `auto` (adam/adamw -> sgd): the SWATS estimate of the SGD LR that matches the parent's Adam
    steps."""
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] | None = None
    """Adam's (beta1, beta2); for muon, those of the AdamW it uses on non-matrix parameters."""
    eps: PositiveFloat | None = None
    """Adam's epsilon, added to the denominator."""
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    """SGD momentum (heavy ball); muon's momentum; schedulefree_sgd's averaging beta."""
    nesterov: bool | None = None
    """Nesterov momentum (needs momentum > 0)."""
    weight_decay: NonNegativeFloat | None = None
    """Weight decay: coupled (added to the gradient) for sgd/adam, decoupled for adamw/muon, as torch defines each."""
    handoff: Literal["carry", "reset", "convert"] = "reset"
    """The parent's optimizer state: `reset` starts fresh, `carry` keeps it (same optimizer), `convert` turns Adam's
    bias-corrected first moment into SGD's momentum buffer (adam/adamw -> sgd)."""

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
    """The LR schedule over the stage, a multiple of the stage's peak LR. `warmup_<name>` means `<name>` with a
    required `warmup`."""
    warmup: Duration | None = None
    """Linear warmup from 0 to the peak LR: steps (int) or a fraction of the stage (float in [0, 1])."""
    step_size: Duration | None = None
    """step: the LR is multiplied by `gamma` every `step_size` steps (or fraction of the stage)."""
    milestones: Annotated[list[Duration], Field(max_length=1000)] | None = None
    """multistep: the steps (or fractions) at which the LR is multiplied by `gamma`."""
    gamma: PositiveFloat | None = None
    """step, multistep, exponential: the factor per step size, milestone or step."""
    min_lr: NonNegativeFloat | None = None
    """cosine, decay, wsd, plateau: the LR the decay ends on (absolute)."""
    decay: Duration | None = None
    """wsd: the length of the final decay, steps or a fraction of the stage."""
    shape: Literal["linear", "cosine", "1-sqrt"] | None = None
    """decay, wsd: the decay's shape."""
    pct_start: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    """onecycle: the fraction of the stage spent rising to the peak LR."""
    div_factor: PositiveFloat | None = None
    """onecycle: the start LR is the peak / div_factor."""
    final_div_factor: PositiveFloat | None = None
    """onecycle: the end LR is the start LR / final_div_factor."""
    anneal: Literal["cos", "linear"] | None = None
    """onecycle: the shape of both phases."""
    cut_frac: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    """stlr (ULMFiT's slanted triangular LR): the fraction of the stage spent rising."""
    ratio: Annotated[float, Field(ge=1.0)] | None = None
    """stlr: how much smaller the lowest LR is than the peak."""
    factor: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    """plateau: the LR is multiplied by this on a plateau (ReduceLROnPlateau)."""
    patience: Annotated[int, Field(ge=0, le=MAX_STEPS)] | None = None
    """plateau: evaluations without improvement before the LR is reduced."""
    threshold: NonNegativeFloat | None = None
    """plateau: the least decrease of the validation loss that counts as an improvement (absolute)."""

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
    """L1 penalty on weight matrices added to the loss (with `sgd_l1`: applied by its proximal step instead)."""
    l2: NonNegativeFloat = 0.0
    """L2 penalty on weight matrices added to the loss."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    """Dropout probability for this stage only; unset: the model's own."""
    grad_clip: PositiveFloat | None = None
    """Clip the gradient's global norm to this before every update."""


class RampConfig(Strict):
    """A batch that grows over the stage (optim.batch_ramp), by accumulating more micro-batches:
    from size x accumulate sequences to `to` (rounded down to whole micro-batches) over `over`
    (steps, or a fraction of the stage), `linear` or in `steps` of `increment` sequences
    (Megatron-LM's rampup); the LR optionally scaled with the batch (relative to the start batch)."""

    to: Annotated[int, Field(ge=1, le=10**7)]
    """The batch (sequences per update) the ramp ends on, rounded down to whole micro-batches."""
    over: Duration
    """Updates the ramp takes: a step count or a fraction of the stage's steps."""
    shape: Literal["linear", "steps"] = "linear"
    """`linear` grows every update; `steps` grows by `increment` in equal steps (Megatron-LM's rampup)."""
    increment: Annotated[int, Field(ge=1, le=10**7)] | None = None
    """shape steps: sequences each step of the ramp adds (a multiple of batch.size)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale each update's LR by (batch / start batch) ** 1 (`linear`) or ** 0.5 (`sqrt`)."""

    @model_validator(mode="after")
    def _increment_with_steps(self) -> RampConfig:
        if (self.shape == "steps") != (self.increment is not None):
            raise PydanticCustomError("setting_error", "required by shape: steps and only by it", {"key": "increment"})
        if self.over == 0:
            raise PydanticCustomError("setting_error", "must be > 0 (a ramp over no steps is batch.size)",
                                      {"key": "over"})
        return self


class DumpsAsBefore(Strict):
    """A config that gained keys after stage keys were first written: each of `LATER`, while at its
    default, stays out of the dump, so the data settings and stage keys of existing plans dump (and
    hash) as before. (StageConfig's own later keys are left out of its key in plan.resolve.)"""

    LATER: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_unset_later(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        for key in self.LATER:
            if getattr(self, key) == type(self).model_fields[key].default:
                dumped.pop(key, None)
        return dumped


class BatchConfig(DumpsAsBefore):
    LATER = ("ramp",)
    size: Annotated[int, Field(ge=1, le=10**6)]
    """Sequences (or examples) per micro-batch."""
    accumulate: Annotated[int, Field(ge=1, le=10**5)] = 1
    """Micro-batches per update (gradient accumulation)."""
    full: bool = False
    """One update per pass over the whole training set (full-batch gradient descent, by accumulation)."""
    block_size: Annotated[int, Field(ge=2, le=2**20)] | None = None
    """Tokens per training sequence of a causal_lm stage; unset: the model's context length."""
    ramp: RampConfig | None = None
    """A batch that grows over the stage; unset: the same batch every update."""

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
    """Decay of an exponential moving average of the weights, updated after every update; evaluations use it and the
    stage ends on it."""


class MergeConfig(Strict):
    """A stage that trains nothing: its weights are the average of its parent's checkpoints
    (checkpoint merging instead of a decay, WSM; a model soup of one run's checkpoints). `last`:
    the parent's last K checkpoints at the plan's `checkpoint.every`, its end included; or `from`
    .. `to`: those in that range of the parent's steps. `weights`: uniform, or linear (the i-th
    oldest of K weighs i). The parent saves those steps and keeps them (as a branch's `@STEP`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)
    last: Annotated[int, Field(ge=2, le=10_000)] | None = None
    """Average the parent's last K checkpoints at the plan's checkpoint.every, its end included."""
    from_: Steps | None = Field(None, alias="from")
    """Average the parent's checkpoints from this step (with `to`)."""
    to: Steps | None = None
    """Average the parent's checkpoints up to this step (with `from`)."""
    weights: Literal["uniform", "linear"] = "uniform"
    """`uniform`: a plain mean; `linear`: the i-th oldest of K checkpoints weighs i."""

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
    """Evaluate every N steps (besides the stage's end, always evaluated)."""
    each_epoch: bool = False
    """Evaluate at the end of every epoch."""
    batches: Annotated[int, Field(ge=1, le=10**7)] | Literal["all"] = 50
    """Validation batches per evaluation of a causal_lm stage, or `all`; the fine-tuning tasks evaluate every
    validation example."""
    beam: Annotated[int, Field(ge=1, le=16)] = 1
    """seq2seq: beam width of the decoding scored by BLEU / chrF (1: greedy)."""
    metrics: Annotated[list[Name], Field(min_length=1, max_length=64)] | None = None
    """The scores of decoded outputs to compute instead of the task's own (without `val_`: rouge1, exact_match, ...);
    sft decodes the first `batches` x batch.size validation prompts for them."""


class LayersConfig(Strict):
    """Which parameters train, and how fast (optim.layers). `freeze`: glob patterns of parameter
    names that get no gradient in this stage. `unfreeze: gradual`: ULMFiT's schedule, the top
    layer group in the first epoch and one more group each epoch. `lr_factor`: discriminative
    LRs, each layer group below the top one learns `lr_factor` times slower (ULMFiT: 2.6)."""

    freeze: Annotated[list[Name], Field(max_length=256)] = []
    """Glob patterns of parameter names that get no gradient in this stage."""
    unfreeze: Literal["all", "gradual"] = "all"
    """`gradual`: ULMFiT's schedule, the top layer group in the first epoch and one more each epoch (needs epochs)."""
    lr_factor: Annotated[float, Field(ge=1.0)] = 1.0
    """Discriminative LRs: each layer group below the top learns lr_factor times slower (ULMFiT: 2.6)."""


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

    LATER = ("mix",)
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
    format: Literal["auto", "text", "json", "csv", "tsv", "parquet"] = "auto"
    """How the files are read; `auto`: by extension."""
    max_len: Annotated[int, Field(ge=2, le=2**20)] | None = None
    """Fine-tuning tasks: tokens per example (longer ones are cut)."""
    pack: bool = False
    """sft: pack several examples into one row."""

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
    """The adapter's rank."""
    alpha: PositiveFloat = 16.0
    """The adapter's scale is alpha / r."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout on the adapter's input."""
    target_modules: Annotated[list[Name], Field(min_length=1, max_length=256)] | Literal["all-linear"] | None = None
    """The modules it adapts (names, or `all-linear`); unset: peft's default for the architecture."""


class AdapterConfig(Strict):
    """A stage that trains an adapter on its parent's model, the base weights frozen
    (models.adapters). `from_parent`, when the parent stage has an adapter too: `keep` trains that
    adapter on (its settings; `lora` may be left out), `merge` folds it into the weights and starts
    this stage's, `new` leaves it out (the parent's base weights) and starts this stage's."""

    lora: LoraSettings | None = None
    """A LoRA adapter (peft's LoraConfig); may be left out with from_parent keep."""
    from_parent: Literal["keep", "merge", "new"] = "keep"
    """When the parent has an adapter: `keep` trains it on, `merge` folds it into the weights and starts a new one,
    `new` starts a new one on the parent's base weights."""


class StageConfig(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)
    name: StageName
    """The stage's name: unique in the plan; it also seeds the stage's data order."""
    from_: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(@[0-9]+)?$",
                                     max_length=100)] | None = Field(None, alias="from")
    """The parent: `NAME` (its end), `NAME@STEP` (its checkpoint at that step) or `init` (the model as built);
    default: the previous stage. A plan with branches is a tree."""
    task: TaskName = "causal_lm"
    """What the stage trains: causal_lm, sft, classify, seq2seq, tag (or a registered plug-in task)."""
    data: DataConfig | None = None
    """The stage's own data; unset: the plan's `data`."""
    adapter: AdapterConfig | None = None
    """Train an adapter, the base weights frozen; unset: the stage trains the model's own weights."""
    layers: LayersConfig = LayersConfig()
    """Which parameters train, and how fast."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The stage's optimizer and its hand-off from the parent."""
    schedule: ScheduleConfig = ScheduleConfig()
    """The stage's LR schedule."""
    regularization: RegularizationConfig = RegularizationConfig()
    """Penalties, dropout and gradient clipping; not inherited (use `defaults`)."""
    batch: BatchConfig
    """The batch: micro-batch size, accumulation, full batch, ramp."""
    steps: Steps | None = None
    """Duration in updates (exactly one of steps, epochs, tokens)."""
    epochs: Annotated[int, Field(ge=1, le=10**6)] | None = None
    """Duration in passes over the training data."""
    tokens: Annotated[int, Field(ge=1, le=10**15)] | None = None
    """Duration in training tokens."""
    eval: EvalConfig = EvalConfig()
    """When and how the stage is evaluated."""
    until: UntilConfig | None = None
    """End the stage early when a condition holds; the duration stays the upper bound."""
    rules: Annotated[list[RuleConfig], Field(max_length=64)] = []
    """Conditions and actions checked during the stage (`when` -> `do`)."""
    on_plateau: OnPlateauConfig | None = None
    """A rule on a plateau of the metric; by default ReduceLROnPlateau's x0.1."""
    guard: GuardConfig | None = None
    """Checks before every update: non-finite values and spikes never reach the weights."""
    inject: Annotated[list[InjectConfig], Field(max_length=64)] = []
    """Faults on purpose, for tests and benchmarks."""
    end: Literal["best", "last"] = "last"
    """`best`: the stage ends on (hands on, exports) the weights of its best evaluation, by val_loss or the metric
    its until / on_plateau names; `last`: those of its last update."""
    average: AverageConfig | None = None
    """Weight averaging during the stage (EMA)."""
    merge: MergeConfig | None = None
    """A stage that trains nothing: the average of its parent's checkpoints."""
    allow_nonfinite: bool = False
    """`true`: a non-finite loss or gradient norm does not stop a stage without a guard (its end is still checked:
    non-finite weights or metrics are never saved as complete)."""

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


class ModelConfig(DumpsAsBefore):
    """`arch` (a task's built-in model, e.g. `gpt` (models.gpt), or a transformers model type,
    built from config with the other keys as its config fields) or `pretrained` (a local directory
    or hub name). Size keys are checked against the model's constructor or the architecture's
    config class (models.keys)."""

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
