"""Append-only JSON-lines logs: metrics.jsonl (train/eval numbers) and events.jsonl (decisions)."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagewise.engine.trackers.tracking import RunEnd
from stagewise.errors import WriteFailed

if TYPE_CHECKING:
    from stagewise.engine.trackers.tracking import Tracking

# Events about the process that trained a stage, not about the stage: a run reusing it logs its own.
PROCESS_EVENTS = frozenset({"stage_start", "stage_resumed", "stage_end", "checkpoint_saved", "stage_saved",
                            "stage_reused", "checkpoint_invalid"})


class JsonlLog:
    """One JSON object per line, flushed on every write so a killed run keeps what it logged. A
    write that fails (a full disk) is a WriteFailed naming the file; the torn line it may leave
    is dropped when the log is opened again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            _drop_torn_line(path)
            self._file = path.open("a", encoding="utf-8")
        except OSError as e:
            raise WriteFailed(path, e) from None

    def write(self, record: dict[str, Any]) -> None:
        try:
            if not self.path.exists():  # deleted (or its folder): the open file's lines would go nowhere
                raise FileNotFoundError(errno.ENOENT, "deleted while the run was writing it")
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as e:
            raise WriteFailed(self.path, e) from None

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite the log without the records `keep` rejects (a resumed stage drops the lines it
        is about to log again), atomically."""
        self._file.close()
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n"
                                   for r in read_jsonl(self.path) if keep(r)), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise WriteFailed(self.path, e) from None
        finally:
            self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as e:
            raise WriteFailed(self.path, e) from None


class _Discarded(JsonlLog):
    """A log that writes nothing: a data-parallel run's ranks other than 0."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        pass

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogs:
    """The run's two logs, each record also fed to the run's trackers (engine.trackers: TensorBoard
    in RUN/tensorboard/ unless the plan's `track:` says otherwise). Events carry a wall-clock
    timestamp; metrics carry the global step. `write=False`: nothing is written (the ranks of a
    data-parallel run other than 0)."""

    def __init__(self, run_dir: Path, write: bool = True, tracking: Tracking | None = None) -> None:
        log = JsonlLog if write else _Discarded
        self.write = write
        self.metrics = log(run_dir / "metrics.jsonl")
        self.events = log(run_dir / "events.jsonl")
        self.tracking = tracking if write else None

    def event(self, event: str, **fields: Any) -> None:
        if not self.write:
            return
        self._event({"event": event, "time": round(time.time(), 3), **fields})

    def metric(self, kind: str, **fields: Any) -> None:
        if not self.write:
            return
        self._metric({"kind": kind, **fields})

    def _event(self, record: dict[str, Any]) -> None:
        self.events.write(record)
        if self.tracking is not None:
            self.tracking.event(record)

    def _metric(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.tracking is not None:
            self.tracking.metric(record)

    def stage_lines(self, stage: str) -> dict[str, list[dict[str, Any]]]:
        """A stage's metric lines and the events that say what happened in it (evaluations and
        decisions, not those about this process: its start, checkpoints, end), to keep with its
        final checkpoint: a run that reuses the stage shows its history too."""
        if not self.write:
            return {"metrics": [], "events": []}
        return {"metrics": [r for r in read_jsonl(self.metrics.path) if r.get("stage") == stage],
                "events": [r for r in read_jsonl(self.events.path)
                           if r.get("stage") == stage and r.get("event") not in PROCESS_EVENTS]}

    def bring_back(self, stage: str, lines: dict[str, list[dict[str, Any]]]) -> None:
        """A reused stage's lines (stage_lines), unless this run's log has the stage already (it
        trained or reused the stage before)."""
        if not self.write or any(r.get("stage") == stage for r in read_jsonl(self.events.path)):
            return
        for record in lines["metrics"]:
            self._metric(record)
        for record in lines["events"]:
            self._event(record)

    def close(self, end: RunEnd | None = None) -> None:
        """Close the logs and finish the trackers (`end`: how the run ended, failed when not
        given); the first failure is raised once all are closed."""
        if not self.write:
            return
        failed = None
        for log in (self.metrics, self.events):
            try:
                log.close()
            except WriteFailed as e:
                failed = failed or e
        if self.tracking is not None:
            try:
                self.tracking.finish(end or RunEnd("failed"))
            except WriteFailed as e:
                failed = failed or e
        if failed is not None:
            raise failed


def _drop_torn_line(path: Path) -> None:
    """A write killed mid-line leaves a partial last line; appending after it would corrupt the next."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a torn last line (a killed write) is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def started_threads(run_dir: Path) -> int | None:
    """The thread count a run in `run_dir` last started with (its newest plan_start event), or None."""
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return None
    starts = [r for r in read_jsonl(path) if r.get("event") == "plan_start" and isinstance(r.get("threads"), int)]
    return starts[-1]["threads"] if starts else None
