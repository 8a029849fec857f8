"""The experiment trackers a plan's `track:` names, made from their registry entries
(config.registry.TRACKERS: stagewise's own, by module and class, imported only when a run uses
one; a plug-in's, by its class), after checking that the library each drives imports."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from stagewise.config.registry import TRACKERS
from stagewise.config.track_config import TrackEntry
from stagewise.engine.trackers.tracking import Tracker
from stagewise.errors import UserError


def check_installed(entries: Sequence[TrackEntry], where: str) -> None:
    """UserError naming the extra when a named tracker's library cannot be imported (not
    installed, or broken): before a run starts, never part way. The run imports it next anyway."""
    for i, tracker in enumerate(entries):
        entry = TRACKERS[tracker.name]
        if not isinstance(entry.tracker, str) and not (isinstance(entry.tracker, type)
                                                       and issubclass(entry.tracker, Tracker)):
            raise UserError(f"{where}: track[{i}]", f"tracker '{tracker.name}' is registered with {entry.tracker!r}, "
                                                    "not a subclass of stagewise.engine.trackers.tracking.Tracker")
        if entry.package is None:
            continue
        try:
            importlib.import_module(entry.package)
        except ImportError:
            install = f"'stagewise[{entry.extra}]'" if entry.extra else entry.package
            raise UserError(f"{where}: track[{i}]", f"tracker '{tracker.name}' needs the {entry.package} package, "
                                                    f"which cannot be imported: pip install {install}") from None


def make_trackers(entries: Sequence[TrackEntry]) -> list[Tracker]:
    """The trackers, made (check_installed has checked them)."""
    out = []
    for tracker in entries:
        entry = TRACKERS[tracker.name]
        if isinstance(entry.tracker, str):  # stagewise's own: "module:Class"
            module, name = entry.tracker.split(":")
            cls = getattr(importlib.import_module(module), name)
        else:
            cls = entry.tracker
        out.append(cls(tracker.name, tracker.settings))
    return out
