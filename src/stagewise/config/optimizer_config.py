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
    # `on_plateau` lr_scale rule, so there is one plateau mechanism (train.control).
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
