"""The run directory a `train` writes into: marked as a run when the tool creates it, locked by
the process training it, and only ever deleted (`--fresh`) when it is a run.

RUN/.stagewise-run marks a directory the tool made (a folder of someone's files never has it);
RUN/.stagewise-lock is held (filelock, non-blocking) while a process trains into RUN, and
RUN/.stagewise-lock.json says who that is, for the message a second process prints.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from stagewise.errors import UserError, WriteFailed

MARKER = ".stagewise-run"
LOCK = ".stagewise-lock"
HOLDER = ".stagewise-lock.json"
LOOK_SECONDS = 2.0  # how long `train` waits for the lock before saying who holds it


def is_run(path: Path) -> bool:
    """A directory this tool created as a run; also one written before runs were marked (its
    events.jsonl starts with the tool's plan_start)."""
    if (path / MARKER).is_file():
        return True
    try:
        with (path / "events.jsonl").open("rb") as f:
            first = json.loads(f.readline(1 << 16))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("event") == "plan_start"


def is_training(path: Path) -> bool:
    """Whether a process holds the run's lock now. The OS frees the lock of a killed process, so a
    run stopped too hard to log it reads as not training (interrupted), one training as training."""
    if not (path / LOCK).is_file():
        return False
    lock = FileLock(str(path / LOCK), blocking=False)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:  # a lock it cannot open (a read-only disk, another user's run): not known to train
        return False
    lock.release()
    return False


def check_run_directory(path: Path, fresh: bool) -> None:
    """UserError unless `path` is a new or empty directory, or a run no other process trains into
    now: `train` writes only into those, and `--fresh` empties only a run."""
    where = f"--out {path}"
    try:
        is_dir, is_other = path.is_dir(), path.exists() and not path.is_dir()
        holds = is_dir and any(path.iterdir())
    except OSError as e:  # a name too long, a directory not readable
        raise UserError(where, f"cannot be read ({e.strerror or e})") from None
    if is_other:
        raise UserError(where, "is a file, not a run directory")
    if holds and not is_run(path):
        what = "deletes only run directories" if fresh else "writes only into a new directory or a run"
        raise UserError(where, f"holds files but is not a stagewise run (no {MARKER}); train {what}: "
                               "nothing was touched, choose another --out")
    if (path / LOCK).is_file():  # said before any preparation (data, models), not after it
        lock = FileLock(str(path / LOCK), blocking=False)
        _acquire(path, lock)
        lock.release()


def make_run_directory(path: Path) -> None:
    """Create `path` (and its parents) marked as a run, for a caller that writes into it before
    `train` does (a search trial's console log)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / MARKER).is_file():
            (path / MARKER).write_text(json.dumps({"created": round(time.time(), 3)}))
    except OSError as e:
        raise WriteFailed(path, e) from None


@contextmanager
def run_directory(path: Path, fresh: bool) -> Iterator[bool]:
    """Create (or open) the run directory and hold its lock while the block trains into it;
    `fresh`: empty it first, if it is a run. Yields whether an earlier run is continued."""
    check_run_directory(path, fresh)
    make_run_directory(path)
    lock = FileLock(str(path / LOCK), blocking=False)
    _acquire(path, lock)
    try:
        if fresh:
            _empty(path)
        try:
            (path / HOLDER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        except OSError as e:
            raise WriteFailed(path / HOLDER, e) from None
        yield (path / "events.jsonl").exists()
    finally:
        (path / HOLDER).unlink(missing_ok=True)
        lock.release()


def _acquire(path: Path, lock: FileLock) -> None:
    """The run's lock, or one line saying who trains into the run."""
    try:
        lock.acquire(timeout=LOOK_SECONDS, blocking=True)  # `stagewise runs` may be looking at the lock this instant
    except Timeout:
        raise UserError(f"--out {path}", f"is being trained by {_holder(path)}; wait for it to finish or choose "
                                         "another --out") from None
    except OSError as e:
        raise WriteFailed(path / LOCK, e) from None


def _holder(path: Path) -> str:
    try:
        info = json.loads((path / HOLDER).read_text())
        return f"pid {info['pid']} on {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _empty(path: Path) -> None:
    """Delete a run's contents, the marker and the lock apart (`--fresh`)."""
    for child in path.iterdir():
        if child.name in (MARKER, LOCK, HOLDER):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
