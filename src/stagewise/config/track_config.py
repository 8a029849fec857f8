"""The plan's `track:` key: the experiment trackers a run logs to, each a name or a one-key
mapping of the name to its settings:

    track: [tensorboard, wandb, {mlflow: {tracking_uri: sqlite:///runs/mlflow.db}}]

Each tracker has its own settings model (unknown keys and did-you-mean work per tracker, a
plug-in's too: config.registry.TRACKERS); the trackers themselves live in engine.trackers. The
plan's `callbacks:` key names plug-in callbacks the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.fields import Name, Strict, settings_error, suggest
from stagewise.config.registry import CALLBACKS, TRACKERS, Registry, TrackerEntry

Tag = Annotated[str, Field(min_length=1, max_length=256)]


class TensorBoardSettings(Strict):
    """TensorBoard takes no settings: it writes RUN/tensorboard/."""


class TrackerSettings(Strict):
    """What every tracker but TensorBoard takes."""

    project: Name | None = None
    """The W&B project, MLflow experiment or trackio project; unset: the plan's name."""
    run_name: Name | None = None
    """The tracker run's name; unset: the run directory's name."""
    tags: Annotated[list[Tag], Field(max_length=64)] = []
    """Tags of the tracker run (MLflow: tags with an empty value)."""


class WandbSettings(TrackerSettings):
    mode: Literal["offline", "online"] = "offline"
    """`offline`: written under RUN/wandb/ only (`wandb sync` uploads it later); `online`: to the server that
    `wandb login` (or WANDB_API_KEY and WANDB_BASE_URL) names."""
    entity: Name | None = None
    """The W&B entity (user or team); unset: the login's default."""


class MlflowSettings(TrackerSettings):
    tracking_uri: Name | None = None
    """An MLflow tracking URI (`http://host:5000`, `sqlite:///path.db`, ...); unset: MLFLOW_TRACKING_URI when
    set, else `sqlite:///RUN/mlflow.db` with artifacts in RUN/mlflow-artifacts."""


class TrackioSettings(TrackerSettings):
    space_id: Name | None = None
    """A Hugging Face Space to log to; unset: trackio's local store (TRACKIO_DIR)."""


class Named(Strict):
    """One entry of a list of registered things (`registry`): its name alone, or a one-key
    mapping of the name to its settings. Names that are no field (extra keys: a plug-in's) are
    checked against the registry, their settings by the entry's settings model."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)
    registry: ClassVar[Registry[Any]]

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        """`wandb` and `{wandb: }` mean `{wandb: {}}`."""
        if isinstance(value, str):
            return {value: {}}
        if isinstance(value, dict):
            return {k: {} if v is None else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _one(self) -> Named:
        extra = self.__pydantic_extra__ or {}
        if extra:  # a plug-in's: checked here (the registry is looked up only then)
            known = list(dict.fromkeys([*type(self).model_fields, *self.registry]))
            for name, given in extra.items():
                if name not in self.registry or name in type(self).model_fields:
                    raise PydanticCustomError("setting_error", "unknown key{hint}",
                                              {"key": name, "hint": suggest(name, known)})
                settings = self.registry[name].settings
                if settings is None:
                    if given != {}:
                        raise PydanticCustomError("setting_error", "{kind} '{name}' takes no settings",
                                                  {"key": name, "kind": self.registry.kind, "name": name})
                    continue
                try:
                    extra[name] = settings.model_validate(given)
                except ValidationError as e:
                    raise settings_error(e, settings, [name]) from None
        named = [k for k in type(self).model_fields if getattr(self, k) is not None] + list(extra)
        if len(named) != 1:
            raise PydanticCustomError("one_entry", "one {kind} per entry (got {n}): a list item is a name or "
                                      "{{name: {{settings}}}}", {"n": len(named), "kind": self.registry.kind})
        return self

    @property
    def name(self) -> str:
        return next(k for k in [*type(self).model_fields, *(self.model_extra or {})] if getattr(self, k) is not None)

    @property
    def settings(self) -> Any:
        """Its settings (a model instance; {} for a plug-in that takes none)."""
        return getattr(self, self.name)


class TrackEntry(Named):
    """One tracker: exactly one of these keys (or a plug-in's, registered with
    stagewise.register_tracker), or its name alone."""

    registry = TRACKERS
    tensorboard: TensorBoardSettings | None = None
    """TensorBoard event files in RUN/tensorboard/ (`tensorboard --logdir runs/`)."""
    wandb: WandbSettings | None = None
    """Weights & Biases (the `stagewise[wandb]` extra)."""
    mlflow: MlflowSettings | None = None
    """MLflow (the `stagewise[mlflow]` extra)."""
    trackio: TrackioSettings | None = None
    """trackio (the `stagewise[trackio]` extra)."""


class CallbackUse(Named):
    """A callback registered by a plug-in (stagewise.register_callback): its name, or
    `{name: {settings}}` checked by its settings model."""

    registry = CALLBACKS


def _each_once(why: str) -> Any:
    def check(entries: list[Named]) -> list[Named]:
        names = [e.name for e in entries]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise PydanticCustomError("setting_error", "'{name}' is named twice ({why})",
                                          {"key": [i], "name": name, "why": why})
        return entries
    return AfterValidator(check)


Track = Annotated[list[TrackEntry], Field(max_length=8), _each_once("one tracker run per tracker")]
Callbacks = Annotated[list[CallbackUse], Field(max_length=64), _each_once("each callback's state is saved under its name")]
DEFAULT_TRACK = [TrackEntry(tensorboard=TensorBoardSettings())]

for _name, _settings, _tracker, _package, _extra in (
        ("tensorboard", TensorBoardSettings, "tensorboard:TensorBoardTracker", "tensorboard", None),
        ("wandb", WandbSettings, "wandb:WandbTracker", "wandb", "wandb"),
        ("mlflow", MlflowSettings, "mlflow:MlflowTracker", "mlflow", "mlflow"),
        ("trackio", TrackioSettings, "trackio:TrackioTracker", "trackio", "trackio")):
    TRACKERS[_name] = TrackerEntry(_settings, f"stagewise.engine.trackers.{_tracker}", _package, _extra)
