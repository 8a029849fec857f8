"""Reading finished (or running) runs back without training anything: the list of runs under a
directory and a run's report page. Neither imports torch (`stagewise runs` starts fast); the
report's plotting (matplotlib) is imported only when a page is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stagewise.track.runs import Run as RunRecord
from stagewise.track.runs import find_runs


def runs(root: str | Path = "runs") -> list[RunRecord]:
    """Every run below `root` (nested too: a search keeps its trials in one folder), the most
    recently updated first. Each has `path`, `name`, `state` (running, complete, interrupted,
    failed), `planned_stages`, `done_stages`, `last_time` and `best(metric)`, read from its
    events.jsonl; `stagewise.open_run(run.path)` opens one with its metrics and exports."""
    return find_runs(Path(root))


def report(run: str | Path | Sequence[str | Path], *, out: str | Path | None = None) -> Path:
    """Plots and an HTML page (report.html) of a run, or of a search directory; of several runs, one
    page comparing them. Written to `out` (default: the first run's directory); returns the page."""
    from stagewise.track.report import write_report

    dirs = [Path(run)] if isinstance(run, (str, Path)) else [Path(r) for r in run]
    return write_report(dirs, None if out is None else Path(out))
