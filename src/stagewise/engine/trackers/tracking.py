"""What a tracker is: a sink for the run's log lines. It sees the run start (with the resolved
plan), every metrics.jsonl and events.jsonl record as it is written, and the run end (with the
report, the summary and the exports); it knows nothing else of the engine.

`Tracking` feeds the trackers of one run (rank 0 only): it keeps each tracker's run id in
RUN/trackers.json so a resumed run continues the same tracker run, skips the metrics lines a
tracker already got before the run was cut off (a resumed stage logs them again), and turns a
tracker that raises into one warning line: the run goes on without it.
"""

from __future__ import annotations

import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagewise.config.fields import Strict
from stagewise.errors import WriteFailed

STATE = "trackers.json"  # in the run directory: each tracker's run id and what it was sent

# Position fields of a metrics line, not measurements.
POSITION = ("kind", "step", "stage", "stage_step", "attempt")
# Events a tracker is not sent: an eval's numbers are its metrics line; checkpoints are bookkeeping.
QUIET = {"eval", "checkpoint_saved"}


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker starts with. `run_id`: its run to continue (a resumed run), else None."""

    run_dir: Path
    plan: dict[str, Any]  # the resolved plan, as RUN/plan.yaml holds it
    project: str
    run_name: str
    run_id: str | None
    state: dict[str, Any]  # the tracker's own, kept in RUN/trackers.json across resumes (JSON values)


# Writes a run directory's report page and returns its path (track.report.write_report, passed down).
ReportWriter = Callable[[Path], Path]


@dataclass(frozen=True)
class RunEnd:
    """How the run ended: `status` complete | interrupted | failed; at a complete end, the report
    page, the summary rows (one per stage) and each stage's export directory."""

    status: str
    report: Path | None = None
    summary: list[dict[str, Any]] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)


class Tracker(ABC):
    """One tracker run per plan run, every stage on the plan's step axis. `fatal`: a failure is
    the run's own (it writes into the run directory) and stops it like any write of the run."""

    fatal = False

    def __init__(self, name: str, settings: Strict) -> None:
        self.name = name
        self.settings = settings

    @abstractmethod
    def start(self, run: TrackedRun) -> str:
        """Open (or, with run.run_id, continue) the tracker run; returns its id."""

    @abstractmethod
    def metric(self, record: dict[str, Any], series: dict[str, float]) -> None:
        """One metrics line; `series`: its numbers under the names every tracker shows them by."""

    @abstractmethod
    def event(self, record: dict[str, Any], step: int) -> None:
        """One event a person looks for (stage boundaries, optimizer switches, rules, guards),
        at the plan step it happened."""

    @abstractmethod
    def finish(self, end: RunEnd) -> None:
        """Attach the end's files and close the tracker run."""


def series(record: dict[str, Any], branch: str | None = None) -> dict[str, float]:
    """The names and values one metrics line becomes, the same in every tracker: `train/loss` on
    the plan's axis (a branch's stages under `<branch>/train/loss`, their own line) and
    `stage/<stage>/train/loss` for one stage alone."""
    kind = str(record.get("kind", "metric"))
    prefix = "val" if kind == "eval" else kind
    out = {}
    for key, value in record.items():
        if key in POSITION or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = f"{prefix}/{key.removeprefix(prefix + '_')}"
        out[f"{branch}/{name}" if branch else name] = float(value)
        if "stage" in record:
            out[f"stage/{record['stage']}/{name}"] = float(value)
    return out


def branches(stages: Sequence[dict[str, Any]]) -> dict[str, str | None]:
    """Each stage's branch: None on the plan's first root-to-leaf path (its trunk); else the name
    of the stage where its path left the trunk. Branches overlap the trunk's steps, so each is a
    line of its own."""
    parents: dict[str, str | None] = {s["name"]: s.get("parent") for s in stages}
    trunk: list[str] = []
    leaf = next((s["name"] for s in stages if s["name"] not in parents.values()), None)
    while leaf is not None and leaf not in trunk:
        trunk.append(leaf)
        leaf = parents.get(leaf)
    out: dict[str, str | None] = {}
    for name in parents:
        chain = [name]
        while chain[-1] not in trunk and (parent := parents.get(chain[-1])) is not None and parent not in chain:
            chain.append(parent)
        off = [n for n in chain if n not in trunk]
        out[name] = off[-1] if off else None
    return out


class Tracking:
    """The trackers of one run, fed in order; see the module's docstring."""

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker], plan: dict[str, Any],
                 warn: Callable[[str], None] | None = None) -> None:
        self.run_dir = run_dir
        self._warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self._state = _read_state(run_dir / STATE)
        self._branches: dict[str, str | None] = {}
        self._step = 0
        self.live: list[Tracker] = []
        self._returned: Any = None
        project, run_name = str(plan.get("name", "stagewise")), run_dir.resolve().name
        for tracker in trackers:
            mine = self._state.setdefault(tracker.name, {})
            run = TrackedRun(run_dir, plan, getattr(tracker.settings, "project", None) or project,
                             getattr(tracker.settings, "run_name", None) or run_name, mine.get("run_id"),
                             mine.setdefault("own", {}))
            mine.setdefault("sent", {})
            self.live.append(tracker)
            if self._call(tracker, "start", tracker.start, run):
                mine["run_id"] = self._returned
        self._save()

    @property
    def wants_files(self) -> bool:
        """Whether a tracker takes the end's files (the report is written for it)."""
        return any(not t.fatal for t in self.live)

    def metric(self, record: dict[str, Any]) -> None:
        self._step = int(record.get("step", self._step))
        key = "|".join(str(record.get(k, "")) for k in ("stage", "attempt", "kind"))
        numbers = series(record, self._branches.get(str(record.get("stage"))))
        sent = False
        for tracker in list(self.live):
            done = self._state[tracker.name]["sent"]
            if key in done and int(record.get("stage_step", 0)) <= done[key]:
                continue  # logged before the run was cut off; a resumed stage logs it again
            if self._call(tracker, "metric", tracker.metric, record, numbers):
                done[key] = int(record.get("stage_step", 0))
                sent = True
        if sent:
            self._save()

    def event(self, record: dict[str, Any]) -> None:
        if record["event"] == "plan_start":
            self._branches = branches(record.get("stages", []))
        if isinstance(record.get("step"), int):
            self._step = record["step"]
        if record["event"] in QUIET:
            return
        for tracker in list(self.live):
            self._call(tracker, "event", tracker.event, record, self._step)
        self._save()

    def finish(self, end: RunEnd) -> None:
        """Every tracker is finished; the first fatal failure is raised after."""
        failed = None
        for tracker in list(self.live):
            try:
                self._call(tracker, "finish", tracker.finish, end)
            except Exception as e:
                failed = failed or e
        self.live = []
        self._save()  # what the trackers counted at the end (a resumed run goes on from it)
        if failed is not None:
            raise failed

    def _call(self, tracker: Tracker, what: str, method: Callable[..., Any], *args: Any) -> bool:
        """Call one of a tracker's methods (its result in `_returned`); a failure is one warning
        line and the tracker is dropped."""
        if tracker.fatal:
            self._returned = method(*args)
            return True
        try:
            self._returned = method(*args)
            return True
        except Exception as e:  # whatever the library raises (server gone, disk full): never the run's end
            message = " ".join(str(e).split())[:300]
            self._warn(f"warning: tracker {tracker.name} failed at {what} ({type(e).__name__}: {message}); "
                       "the run goes on without it")
            if tracker in self.live:
                self.live.remove(tracker)
            return False

    def _save(self) -> None:
        """RUN/trackers.json, replaced whole: a write of the run directory, failing as any does."""
        path, tmp = self.run_dir / STATE, self.run_dir / (STATE + ".tmp")
        try:
            tmp.write_text(json.dumps(self._state), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise WriteFailed(path, e) from None


def _read_state(path: Path) -> dict[str, Any]:
    """The trackers' state; what is not of its shape (a damaged file) is left out: a tracker
    without it starts a new tracker run."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict):
        return {}
    return {name: mine for name, mine in state.items()
            if isinstance(mine, dict) and isinstance(mine.get("run_id"), str | None)
            and isinstance(mine.get("sent", {}), dict) and isinstance(mine.get("own", {}), dict)}
