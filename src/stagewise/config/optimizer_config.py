"""The optimizer and learning-rate schedule of a stage: which settings each one takes and their
defaults; a setting given to one that does not use it is an error, and one that is not given
takes that optimizer's or schedule's default (`settings()`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.fields import MAX_STEPS, Duration, NonNegativeFloat, PositiveFloat, Strict


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
