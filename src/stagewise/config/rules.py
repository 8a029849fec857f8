"""What a stage may say about reacting to what training shows: `until` (end the stage early),
`rules` / `on_plateau` (condition -> action on each evaluation, or every step for SWATS), `guard`
(checks before every update against non-finite values and spikes) and `inject` (faults on purpose,
so guards and rules are tested for real)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.fields import MAX_STEPS, Count, NonNegativeFloat, PositiveFloat, Steps, Strict
from stagewise.config.registry import TASKS


def _known(value: str, kind: str, names: list[str]) -> str:
    if value not in names:
        raise PydanticCustomError(kind, "input should be {names}", {"names": ", ".join(f"'{n}'" for n in names)})
    return value


def _known_metric(value: str) -> str:
    """A metric some task reports (config.registry); which ones a stage's task reports is checked
    when the plan is resolved. Known when rules are evaluated (after each evaluation): the
    validation metrics, and the mean training loss since the previous log line."""
    metrics = [m for spec in TASKS.values() for m in (*spec.traits.metrics, *(f"val_{s}" for s in spec.traits.selectable))]
    return _known(value, "metric", list(dict.fromkeys(metrics)))


def _known_task(value: str) -> str:
    return _known(value, "task", list(TASKS))


Metric = Annotated[str, AfterValidator(_known_metric)]
TaskName = Annotated[str, AfterValidator(_known_task)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class PlateauConfig(Strict):
    """ReduceLROnPlateau's test (threshold_mode 'abs'): an evaluation improves when it beats the
    best so far by more than `min_delta`; the condition holds on the evaluation that makes
    `patience` + 1 in a row without improvement. After it fires it is quiet for `cooldown`
    evaluations, and counts anew."""

    metric: Metric = "val_loss"
    """The metric watched: val_loss, val_ppl, train_loss or any metric the stage's task logs."""
    patience: Count = 2
    """Evaluations without improvement tolerated; it holds on the one that makes patience + 1."""
    min_delta: NonNegativeFloat = 0.0
    """The least change that counts as an improvement (absolute)."""
    mode: Literal["min", "max"] = "min"
    """`min`: lower is better; `max`: higher is better."""
    cooldown: Count = 0
    """Evaluations to stay quiet after it held."""


class TargetConfig(Strict):
    """Holds once the metric reaches `value` (<= for mode min, >= for max)."""

    metric: Metric = "val_loss"
    """The metric watched."""
    value: float
    """Holds once the metric reaches this (<= for mode min, >= for max)."""
    mode: Literal["min", "max"] = "min"
    """`min`: holds at or below value; `max`: at or above."""


class TimeConfig(Strict):
    """Holds once the stage has trained this long (wall clock, this process and earlier ones).
    Not repeatable from run to run, unlike everything else."""

    minutes: PositiveFloat
    """Holds once the stage has trained this long (wall clock, over resumes)."""


class SwatsConfig(Strict):
    """Keskar & Socher (2017): holds when the bias-corrected average of the SGD step size that
    matches Adam's step has converged to the current estimate, within `tolerance`."""

    tolerance: PositiveFloat = 1e-9
    """How close the averaged SGD step-size estimate must come to the current one."""
    min_steps: Annotated[int, Field(ge=2, le=MAX_STEPS)] = 2
    """Adam steps before the test may hold."""


class UntilConfig(Strict):
    """Ends the stage early when any condition holds; steps/epochs/tokens stay the upper bound."""

    plateau: PlateauConfig | None = None
    """End on a plateau of the metric."""
    target: TargetConfig | None = None
    """End once the metric reaches a value."""
    time: TimeConfig | None = None
    """End after so many minutes of training."""

    @model_validator(mode="after")
    def _something(self) -> UntilConfig:
        if self.plateau is None and self.target is None and self.time is None:
            raise PydanticCustomError("setting_error", "give plateau, target or time", {"key": "plateau"})
        return self


class WhenConfig(Strict):
    """Exactly one condition."""

    plateau: PlateauConfig | None = None
    """Holds on a plateau of the metric."""
    target: TargetConfig | None = None
    """Holds once the metric reaches a value."""
    swats: SwatsConfig | None = None
    """Keskar & Socher's test for switching from Adam to SGD, checked every update (adam/adamw stages)."""

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {data: {}} if data in ("plateau", "swats") else data  # `when: swats`

    @model_validator(mode="after")
    def _exactly_one(self) -> WhenConfig:
        given = [k for k in ("plateau", "target", "swats") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError("setting_error", "give exactly one of plateau, target, swats (got {got})",
                                      {"key": "plateau", "got": ", ".join(given) or "none"})
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("plateau", "target", "swats") if getattr(self, k) is not None)


class LrScaleAction(Strict):
    """ReduceLROnPlateau's reduction: the LR becomes max(lr * factor, min_lr), applied as a factor
    on the stage's schedule from then on."""

    factor: Fraction = 0.1
    """The LR becomes max(lr x factor, min_lr), as a factor on the schedule from then on."""
    min_lr: NonNegativeFloat = 0.0
    """The LR is never scaled below this."""


class SwitchAction(Strict):
    """Change the optimizer for the rest of the stage. `lr: auto` (from adam/adamw to sgd): the
    SWATS estimate. `handoff: convert` (adam/adamw -> sgd with momentum): the momentum buffer
    starts from Adam's first moment; `reset`: fresh state. The schedule's shape continues,
    scaled to start from the new LR."""

    to: Literal["gd", "sgd", "sgd_l1", "adam", "adamw", "muon"]
    """The optimizer for the rest of the stage."""
    lr: PositiveFloat | Literal["auto"] | None = None
    """Its LR; `auto` (adam/adamw -> sgd): the SWATS estimate; unset: the current LR."""
    handoff: Literal["reset", "convert"] = "reset"
    """`reset`: fresh state; `convert` (adam/adamw -> sgd with momentum): the momentum buffer starts from Adam's
    first moment."""
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    """The new optimizer's momentum."""
    nesterov: bool | None = None
    """The new optimizer's Nesterov setting."""
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] | None = None
    """The new optimizer's betas."""
    eps: PositiveFloat | None = None
    """The new optimizer's epsilon."""
    weight_decay: NonNegativeFloat | None = None
    """The new optimizer's weight decay."""

    def settings(self) -> dict[str, Any]:
        """The optimizer settings this switch sets (lr apart)."""
        return {k: v for k in ("momentum", "nesterov", "betas", "eps", "weight_decay")
                if (v := getattr(self, k)) is not None}


class RollbackAction(Strict):
    """Restore the stage's checkpoint of its best evaluation so far and continue from there with
    the LR scaled by `lr_scale`, after skipping `skip_batches` batches of data."""

    lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Scale the LR by this from the rollback on."""
    skip_batches: Count = 0
    """Batches of data to skip after going back."""


class ActionConfig(Strict):
    """Exactly one action; `next_stage` may be written bare (`do: next_stage`)."""

    lr_scale: LrScaleAction | None = None
    """Reduce the LR (ReduceLROnPlateau's reduction)."""
    switch: SwitchAction | None = None
    """Change the optimizer for the rest of the stage."""
    next_stage: Literal[True] | None = None
    """End the stage now (may be written bare: `do: next_stage`)."""
    rollback: RollbackAction | None = None
    """Go back to the stage's best evaluation so far and train on from it."""

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        if data == "next_stage":
            return {"next_stage": True}
        if data in ("lr_scale", "rollback"):
            return {data: {}}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> ActionConfig:
        given = [k for k in ("lr_scale", "switch", "next_stage", "rollback") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "setting_error", "give exactly one of lr_scale, switch, next_stage, rollback (got {got})",
                {"key": "lr_scale", "got": ", ".join(given) or "none"})
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("lr_scale", "switch", "next_stage", "rollback") if getattr(self, k) is not None)


class RuleConfig(Strict):
    when: WhenConfig
    """The condition (exactly one)."""
    do: ActionConfig
    """The action (exactly one)."""
    max_fires: Steps | None = None
    """How often the rule may fire; unset: no limit (rollback: 3)."""


class OnPlateauConfig(PlateauConfig):
    """`on_plateau: {patience: 2, do: ...}`: a rule on a plateau; by default ReduceLROnPlateau's x0.1."""

    do: ActionConfig = ActionConfig(lr_scale=LrScaleAction())
    """The action on a plateau; default: lr_scale by 0.1."""
    max_fires: Steps | None = None
    """How often it may fire; unset: no limit."""

    def rule(self) -> RuleConfig:
        plateau = PlateauConfig(**self.model_dump(exclude={"do", "max_fires"}))
        return RuleConfig(when=WhenConfig(plateau=plateau), do=self.do, max_fires=self.max_fires)


class SpikeConfig(Strict):
    """A spike: the step's loss (or gradient norm) above the mean of the previous `window` steps
    by more than `z` standard deviations, or above `factor` times that mean; not checked in the
    stage's first `warmup` steps."""

    metric: Literal["loss", "grad_norm"] = "loss"
    """What a spike is measured on: the update's loss or gradient norm."""
    z: PositiveFloat | None = None
    """A spike: more than z standard deviations above the mean of the previous `window` steps."""
    factor: Annotated[float, Field(gt=1.0)] | None = None
    """A spike: more than factor x the mean of the previous `window` steps."""
    window: Annotated[int, Field(ge=2, le=10**6)] = 50
    """Steps in the running mean."""
    warmup: Count = 20
    """Steps at the stage's start not checked for spikes."""

    @model_validator(mode="after")
    def _one_test(self) -> SpikeConfig:
        if (self.z is None) == (self.factor is None):
            raise PydanticCustomError("setting_error", "give exactly one of z, factor", {"key": "z"})
        return self


class GuardRollbackConfig(Strict):
    """Go back to the newest checkpoint at least `steps_back` updates before the bad one, skip
    the next `skip_batches` batches of data, and scale the LR by `lr_scale` from then on."""

    steps_back: Count = 0
    """Go back to the newest checkpoint at least this many updates before the bad one."""
    skip_batches: Count = 0
    """Batches of data to skip after going back."""
    lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Scale the LR by this from then on."""


class GuardResetConfig(Strict):
    """`reset_moments` (SPAM, Huang et al., ICLR 2025): the spiking update's gradient is clipped to
    norm `clip` and applied with the optimizer's state started afresh (Adam's moments and step
    count, SGD's momentum), so the spike does not linger in the moments."""

    clip: PositiveFloat = 1.0
    """The spiking update's gradient is clipped to this norm."""


class GuardConfig(Strict):
    """Checked on every update before the optimizer steps: a non-finite loss or gradient norm, and
    a spike when `spike` is set. `skip` drops the update; `rollback` goes back (see above);
    `reset_moments` applies a spiking update clipped, with fresh optimizer moments (a non-finite
    one is skipped). After `max_retries` actions the run stops, resumable, with a message."""

    spike: SpikeConfig | None = None
    """What counts as a spike; unset: only non-finite values are caught."""
    action: Literal["skip", "rollback", "reset_moments"] = "skip"
    """`skip` the update, `rollback` to a checkpoint, or `reset_moments` (SPAM)."""
    rollback: GuardRollbackConfig | None = None
    """Settings of action rollback."""
    reset: GuardResetConfig | None = None
    """Settings of action reset_moments."""
    max_retries: Count = 3
    """Actions before the run stops (exit 3, resumable)."""

    @model_validator(mode="after")
    def _rollback_settings(self) -> GuardConfig:
        if self.rollback is not None and self.action != "rollback":
            raise PydanticCustomError("setting_error", "only with action: rollback", {"key": "rollback"})
        if self.reset is not None and self.action != "reset_moments":
            raise PydanticCustomError("setting_error", "only with action: reset_moments", {"key": "reset"})
        return self

    def reset_settings(self) -> GuardResetConfig:
        return self.reset or GuardResetConfig()

    def rollback_settings(self) -> GuardRollbackConfig:
        return self.rollback or GuardRollbackConfig()


class InjectConfig(Strict):
    """A fault on purpose, for tests and benchmarks. `nan`: the loss of update `at` becomes NaN;
    `loss_spike`: it is multiplied by `factor`; `lr_burst`: the LR is multiplied by `factor` for
    `steps` updates; these happen once (a rollback does not bring them back). `corrupt_batch`: the
    batch drawn at update `at` is replaced by random tokens, every time that batch is drawn (so
    only skipping data gets past it)."""

    at: Count
    """The update the fault is put on."""
    kind: Literal["nan", "loss_spike", "lr_burst", "corrupt_batch"]
    """`nan` loss, `loss_spike` (x factor), `lr_burst` (LR x factor for `steps`), `corrupt_batch`."""
    factor: PositiveFloat = 10.0
    """loss_spike, lr_burst: the multiplier."""
    steps: Steps = 1
    """lr_burst: updates it lasts."""
    rank: Annotated[int, Field(ge=0, le=2**20)] | None = None
    """nan, loss_spike: only on this rank of a data-parallel run (the others see it in the all-reduced loss); unset:
    every rank."""

    @model_validator(mode="after")
    def _rank_faults(self) -> InjectConfig:
        if self.rank is not None and self.kind not in ("nan", "loss_spike"):
            raise PydanticCustomError("setting_error", "only for nan and loss_spike (the other faults act on "
                                                       "what every rank shares)", {"key": "rank"})
        return self

    @model_serializer(mode="wrap")
    def _without_unset_rank(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Unset, `rank` stays out of the dump: stage keys of plans written before it are unchanged."""
        data: dict[str, Any] = handler(self)
        if self.rank is None:
            data.pop("rank", None)
        return data
