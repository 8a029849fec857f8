"""The optimizer and learning-rate schedule of a stage. Which settings each one takes, and their
defaults, are the fields of its settings model in the registry (config.registry; stagewise's own
in config.builtin_settings); a setting given to one that does not use it is an error, and one
that is not given takes that optimizer's or schedule's default (`settings()`). The settings of
stagewise's own optimizers and schedules are typed here; a plug-in's own ones (extra keys) are
checked against its settings model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.fields import MAX_STEPS, Duration, NonNegativeFloat, PositiveFloat, Strict, settings_error, suggest
from stagewise.config.registry import OPTIMIZERS, SCHEDULES, Registry

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Betas = tuple[Beta, Beta]
Momentum = Annotated[float, Field(ge=0.0, lt=1.0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class OptimizerSettings(Strict):
    """An optimizer's settings model: each field a setting it takes, with its default (None:
    inherited from the parent stage, or required). Every optimizer takes `lr`."""

    lr: PositiveFloat | None = None


class ScheduleSettings(Strict):
    """A schedule's settings model: each field a setting it takes, with its default (None: required)."""


class SettingsTable(Mapping[str, dict[str, Any]]):
    """Each registered optimizer's (schedule's) settings and their defaults, by name."""

    def __init__(self, registry: Registry[Any]) -> None:
        self.registry = registry

    def __getitem__(self, name: str) -> dict[str, Any]:
        return {key: field.default for key, field in self.registry[name].settings.model_fields.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.registry)

    def __len__(self) -> int:
        return len(self.registry)


OPTIMIZER_SETTINGS = SettingsTable(OPTIMIZERS)
SCHEDULE_SETTINGS = SettingsTable(SCHEDULES)
ADAM = ("adam", "adamw")  # the optimizers whose steps SWATS reads and whose moment `convert` hands on
# They average their weights (optim.schedule_free): an optimizer a stage starts with, never one switched to.
SCHEDULE_FREE = ("schedulefree_adamw", "schedulefree_sgd")
_OWN = ("name", "handoff")  # keys of the config, not settings of the optimizer


def registered(registry: Registry[Any], exclude: tuple[str, ...] = ()) -> Any:
    """A name in `registry` (but not in `exclude`), refused as pydantic refuses a Literal (the same message)."""
    def check(value: str) -> str:
        if value not in registry or value in exclude:
            names = [f"'{n}'" for n in registry if n not in exclude]
            listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": listed})
        return value
    return AfterValidator(check)


def plugin_settings(model: BaseModel, registry: Registry[Any], name: str | None) -> None:
    """Check the keys that are no field of `model` (extra: a plug-in's settings): a setting of the
    entry `name` is validated by its settings model; a key no entry takes is unknown (did you mean)."""
    extra = dict(model.model_extra or {})
    if not extra:
        return
    known = [*type(model).model_fields, *{k for name in registry for k in registry[name].settings.model_fields}]
    for key in sorted(extra):
        if key not in known:
            raise PydanticCustomError("setting_error", "unknown key{hint}", {"key": key, "hint": suggest(key, known)})
    owners = [name] if name is not None else [n for n in registry if set(extra) <= set(registry[n].settings.model_fields)]
    settings = registry[owners[0]].settings if owners else None
    if settings is None or not set(extra) <= set(settings.model_fields):
        return  # not a setting of this one: only_settings_of names what it takes
    try:
        checked = settings.model_validate(extra)
    except ValidationError as e:
        raise settings_error(e, settings, []) from None
    assert model.__pydantic_extra__ is not None
    model.__pydantic_extra__.update({k: getattr(checked, k) for k in extra})


def only_settings_of(model: BaseModel, kind: str, table: SettingsTable, name: str,
                     own: tuple[str, ...] = _OWN) -> None:
    """Reject a setting given to optimizer/schedule `name` that it does not use (`own`: keys of
    the config itself, not settings)."""
    allowed = table[name]
    for key in sorted(model.model_fields_set - set(own)):
        if key not in allowed:
            raise PydanticCustomError(
                "setting_error",
                "not a setting of {kind} '{name}' (it takes: {allowed})",
                {"key": key, "kind": kind, "name": name, "allowed": ", ".join(sorted(allowed)) or "nothing"},
            )


class OptimizerConfig(Strict):
    """An optimizer. `name` omitted means the parent stage's optimizer; unset settings then come
    from the parent, and a different `name` starts from that optimizer's defaults."""

    # Extra keys: a plug-in optimizer's own settings (checked by its settings model).
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)
    name: Annotated[str, registered(OPTIMIZERS)] | None = None
    """The optimizer: gd, sgd, sgd_l1, adam, adamw, muon, schedulefree_adamw, schedulefree_sgd, or a plug-in's
    (--plugin, entry points). Unset: the parent stage's optimizer and its settings; a different name starts from
    that optimizer's defaults."""
    lr: PositiveFloat | Literal["auto"] | None = None
    """Peak learning rate. Unset: continues from the LR the parent ends on (its real one where only the run knows
    it: after `auto`). `auto` (adam/adamw -> sgd): the SWATS estimate of the SGD LR that matches the parent's Adam
    steps."""
    betas: Betas | None = None
    """Adam's (beta1, beta2); for muon, those of the AdamW it uses on non-matrix parameters."""
    eps: PositiveFloat | None = None
    """Adam's epsilon, added to the denominator."""
    momentum: Momentum | None = None
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
        plugin_settings(self, OPTIMIZERS, self.name)
        if self.name is not None:
            only_settings_of(self, "optimizer", OPTIMIZER_SETTINGS, self.name)
        if self.nesterov and self.momentum == 0.0:
            raise PydanticCustomError("setting_error", "nesterov needs momentum > 0", {"key": "nesterov"})
        return self


class ScheduleConfig(Strict):
    """A learning-rate schedule over one stage, as a multiple of the stage's peak LR.

    `warmup_<name>` is accepted as `<name>` with a required `warmup`.
    """

    # Extra keys: a plug-in schedule's own settings (checked by its settings model).
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)
    name: Annotated[str, registered(SCHEDULES)] = "constant"
    """The LR schedule over the stage, a multiple of the stage's peak LR: constant, step, multistep, exponential,
    cosine, decay, wsd, onecycle, stlr, plateau, or a plug-in's (--plugin, entry points). `warmup_<name>` means
    `<name>` with a required `warmup`."""
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
    pct_start: Fraction | None = None
    """onecycle: the fraction of the stage spent rising to the peak LR."""
    div_factor: PositiveFloat | None = None
    """onecycle: the start LR is the peak / div_factor."""
    final_div_factor: PositiveFloat | None = None
    """onecycle: the end LR is the start LR / final_div_factor."""
    anneal: Literal["cos", "linear"] | None = None
    """onecycle: the shape of both phases."""
    cut_frac: Fraction | None = None
    """stlr (ULMFiT's slanted triangular LR): the fraction of the stage spent rising."""
    ratio: Annotated[float, Field(ge=1.0)] | None = None
    """stlr: how much smaller the lowest LR is than the peak."""
    factor: Fraction | None = None
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
        plugin_settings(self, SCHEDULES, self.name)
        only_settings_of(self, "schedule", SCHEDULE_SETTINGS, self.name)
        for key, default in SCHEDULE_SETTINGS[self.name].items():
            if default is None and getattr(self, key, None) is None:
                raise PydanticCustomError(
                    "setting_error", "required by schedule '{name}'", {"key": key, "name": self.name})
        return self

    def settings(self) -> dict[str, Any]:
        """This schedule's settings, defaults filled in."""
        return {k: (d if getattr(self, k, None) is None else getattr(self, k))
                for k, d in SCHEDULE_SETTINGS[self.name].items()}
