"""Append-only JSON-lines logs: metrics.jsonl (train/eval numbers) and events.jsonl (decisions)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagewise.errors import WriteFailed

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
    """The run's two logs, each record mirrored to TensorBoard (RUN/tensorboard/). Events carry a
    wall-clock timestamp; metrics carry the global step. `write=False`: nothing is written (the
    ranks of a data-parallel run other than 0)."""

    def __init__(self, run_dir: Path, write: bool = True) -> None:
        # imported here: reading logs back (report, runs) should not pay for torch's import
        from stagewise.track.tensorboard import TensorBoardLog

        log = JsonlLog if write else _Discarded
        self.write = write
        self.metrics = log(run_dir / "metrics.jsonl")
        self.events = log(run_dir / "events.jsonl")
        self.tensorboard = TensorBoardLog(run_dir / "tensorboard")

    def event(self, event: str, **fields: Any) -> None:
        if not self.write:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.events.write(record)
        self.tensorboard.event(record)

    def metric(self, kind: str, **fields: Any) -> None:
        if not self.write:
            return
        record = {"kind": kind, **fields}
        self.metrics.write(record)
        self.tensorboard.metric(record)

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
            self.metrics.write(record)
            self.tensorboard.metric(record)
        for record in lines["events"]:
            self.events.write(record)
            self.tensorboard.event(record)

    def close(self) -> None:
        """Close all three; the first failure is raised once all are closed."""
        if not self.write:
            return
        failed = None
        for log in (self.metrics, self.events, self.tensorboard):
            try:
                log.close()
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
