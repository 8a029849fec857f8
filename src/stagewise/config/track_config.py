"""The plan's `track:` key: the experiment trackers a run logs to, each a name or a one-key
mapping of the name to its settings:

    track: [tensorboard, wandb, {mlflow: {tracking_uri: sqlite:///runs/mlflow.db}}]

Each tracker has its own settings model (unknown keys and did-you-mean work per tracker); the
trackers themselves live in engine.trackers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from stagewise.config.fields import Name, Strict

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


class TrackEntry(Strict):
    """One tracker: exactly one of these keys, or its name alone."""

    tensorboard: TensorBoardSettings | None = None
    """TensorBoard event files in RUN/tensorboard/ (`tensorboard --logdir runs/`)."""
    wandb: WandbSettings | None = None
    """Weights & Biases (the `stagewise[wandb]` extra)."""
    mlflow: MlflowSettings | None = None
    """MLflow (the `stagewise[mlflow]` extra)."""
    trackio: TrackioSettings | None = None
    """trackio (the `stagewise[trackio]` extra)."""

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
    def _one(self) -> TrackEntry:
        named = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(named) != 1:
            raise PydanticCustomError("one_tracker", "one tracker per entry (got {n}): a list item is a name or "
                                      "{{name: {{settings}}}}", {"n": len(named)})
        return self

    @property
    def name(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def settings(self) -> Strict:
        return getattr(self, self.name)


def _each_once(entries: list[TrackEntry]) -> list[TrackEntry]:
    names = [e.name for e in entries]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise PydanticCustomError("setting_error", "'{name}' is named twice (one tracker run per tracker)",
                                      {"key": [i], "name": name})
    return entries


Track = Annotated[list[TrackEntry], Field(max_length=8), AfterValidator(_each_once)]
DEFAULT_TRACK = [TrackEntry(tensorboard=TensorBoardSettings())]
