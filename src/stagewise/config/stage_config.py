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
