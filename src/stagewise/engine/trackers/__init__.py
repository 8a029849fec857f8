"""The experiment trackers a plan's `track:` names, by name: the module and class of each, and the
package (an extra of stagewise) it needs. A tracker's module is imported only when a run uses it."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from stagewise.config.track_config import TrackEntry
from stagewise.engine.trackers.tracking import Tracker
from stagewise.errors import UserError


@dataclass(frozen=True)
class Entry:
    module: str  # of stagewise.engine.trackers
    cls: str
    package: str  # the library it drives
    extra: str | None  # the extra of stagewise that installs it (None: a dependency of stagewise)


TRACKERS: dict[str, Entry] = {
    "tensorboard": Entry("tensorboard", "TensorBoardTracker", "tensorboard", None),
    "wandb": Entry("wandb", "WandbTracker", "wandb", "wandb"),
    "mlflow": Entry("mlflow", "MlflowTracker", "mlflow", "mlflow"),
    "trackio": Entry("trackio", "TrackioTracker", "trackio", "trackio"),
}


def check_installed(entries: Sequence[TrackEntry], where: str) -> None:
    """UserError naming the extra when a named tracker's library cannot be imported (not
    installed, or broken): before a run starts, never part way. The run imports it next anyway."""
    for i, tracker in enumerate(entries):
        entry = TRACKERS[tracker.name]
        try:
            importlib.import_module(entry.package)
        except ImportError:
            install = f"'stagewise[{entry.extra}]'" if entry.extra else entry.package
            raise UserError(f"{where}: track[{i}]", f"tracker '{tracker.name}' needs the {entry.package} package, "
                                                    f"which cannot be imported: pip install {install}") from None


def make_trackers(entries: Sequence[TrackEntry]) -> list[Tracker]:
    out = []
    for tracker in entries:
        entry = TRACKERS[tracker.name]
        module = importlib.import_module(f"stagewise.engine.trackers.{entry.module}")
        out.append(getattr(module, entry.cls)(tracker.name, tracker.settings))
    return out
