"""The plan's `track:` key: the experiment trackers a run logs to, each a name or a one-key
mapping of the name to its settings:

    track: [tensorboard, wandb, {mlflow: {tracking_uri: sqlite:///runs/mlflow.db}}]

Each tracker has its own settings model (unknown keys and did-you-mean work per tracker); the
trackers themselves live in track.trackers. A resolved plan dumps them back in the same form.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer
from pydantic_core import PydanticCustomError

from stagewise.plan.base import Name, Strict

Tag = Annotated[str, Field(min_length=1, max_length=256)]


class TrackerConfig(Strict):
    """What every tracker takes: where the run goes (project), its name and tags."""

    tracker: str
    project: Name | None = None  # W&B project, MLflow experiment, trackio project; default: the plan's name
    run_name: Name | None = None  # default: the run directory's name
    tags: Annotated[list[Tag], Field(max_length=64)] = []

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> Any:
        """`{wandb: {project: x}}`, or the bare name when nothing else is set: the form a plan says it in."""
        data = dict(handler(self))
        name = data.pop("tracker")
        settings = {k: v for k, v in data.items() if k in self.model_fields_set}
        return {name: settings} if settings else name


class TensorBoardTracker(TrackerConfig):
    """RUN/tensorboard/, written with the run's own logs (the default when `track:` is not given)."""

    tracker: Literal["tensorboard"] = "tensorboard"


class WandbTracker(TrackerConfig):
    tracker: Literal["wandb"] = "wandb"
    # offline: RUN/wandb/ only, `wandb sync RUN/wandb/offline-run-*` uploads later; online: to
    # the server `wandb login` (or WANDB_BASE_URL / WANDB_API_KEY) names.
    mode: Literal["offline", "online"] = "offline"
    entity: Name | None = None


class MlflowTracker(TrackerConfig):
    tracker: Literal["mlflow"] = "mlflow"
    # Any MLflow tracking URI (http://host:5000, sqlite:///path.db, a folder); default:
    # MLFLOW_TRACKING_URI when set, else sqlite:///RUN/mlflow.db with artifacts in RUN/mlflow-artifacts.
    tracking_uri: Name | None = None


class TrackioTracker(TrackerConfig):
    tracker: Literal["trackio"] = "trackio"
    space_id: Name | None = None  # a Hugging Face Space to log to; default: trackio's local store


TRACKER_CONFIGS: dict[str, type[TrackerConfig]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}
AnyTracker = Annotated[TensorBoardTracker | WandbTracker | MlflowTracker | TrackioTracker, Field(discriminator="tracker")]


def as_trackers(value: Any) -> Any:
    """`wandb` and `{wandb: {..}}` -> `{tracker: wandb, ..}` for the union to pick the model by."""
    if not isinstance(value, list):
        return value
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and len(item) == 1:
            (name, settings), = item.items()
            item = {"tracker": name, **(settings or {})} if isinstance(settings, dict | None) else item
        elif isinstance(item, str):
            item = {"tracker": item}
        if isinstance(item, dict) and isinstance(item.get("tracker"), str) and item["tracker"] not in TRACKER_CONFIGS:
            close = difflib.get_close_matches(item["tracker"][:100], list(TRACKER_CONFIGS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "there are: " + ", ".join(TRACKER_CONFIGS)
            raise PydanticCustomError("setting_error", "no tracker '{name}' ({hint})",
                                      {"key": [i], "name": item["tracker"], "hint": hint})
        out.append(item)
    names = [item.get("tracker") for item in out if isinstance(item, dict)]
    if dup := next((n for i, n in enumerate(names) if n in names[:i]), None):
        raise PydanticCustomError("setting_error", "'{name}' is named twice (one tracker run per tracker)",
                                  {"key": [len(names) - 1 - names[::-1].index(dup)], "name": dup})
    return out
