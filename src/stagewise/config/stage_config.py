"""One stage of a plan: its duration, batch, regularization, evaluation, layers, adapter, merge and
the reactions (config.rules) it declares."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.data_config import DataConfig
from stagewise.config.fields import DumpsAsBefore, Duration, Name, NonNegativeFloat, PositiveFloat, StageName, Steps, Strict
from stagewise.config.optimizer_config import OptimizerConfig, ScheduleConfig
from stagewise.config.rules import GuardConfig, InjectConfig, OnPlateauConfig, RuleConfig, TaskName, UntilConfig


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
    merge: MergeConfig | None = None  # a stage of averaged parent checkpoints, track.trained nothing
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
