"""The one exception type for bad user input (plan, data file, checkpoint, CLI argument), and the
two ways a run stops on purpose.

The CLI prints `str(error)` as a single line and exits 2 (UserError) or the stop's `code`
(RunStopped: 3 a guard or a non-finite value, 4 a write that failed, 128 + N a signal);
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

WRITE_FAILED = 4  # the exit code of a run stopped by a full disk or an unwritable path


class UserError(ValueError):
    """Bad input named by where it is: `file: key.path: what is wrong`."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class RunStopped(Exception):
    """The run stopped on purpose or could not go on (a signal, a full disk); the message says what
    was saved and how to continue. The CLI prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        self.code = code
        super().__init__(message)


class WriteFailed(RunStopped):
    """A file could not be written (the disk is full, the path is read-only, ...): names the path,
    why, and the space left where it goes. The run adds what is intact and how to resume."""

    def __init__(self, path: Path | str, error: BaseException) -> None:
        self.path = Path(path)
        self.reason = _reason(error)
        super().__init__(f"cannot write {self.path}: {self.reason} ({free_space(self.path)} free there)",
                         code=WRITE_FAILED)


def refused_object(error: BaseException) -> str:
    """What torch's safe loader (weights_only) refused in a file, as " (module.name)", or "". Its
    own message advises loading the file unsafely: that is never done, nor passed on."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f" ({found.group(1)})" if found else ""


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or errno.errorcode.get(error.errno, str(error.errno))
    first = (str(error).splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {first[:120]}"


def free_space(path: Path) -> str:
    """The free space of the file system `path` is (or would be) on, e.g. '1.2 GB'."""
    for candidate in (path, *path.absolute().parents):
        try:
            free: float = shutil.disk_usage(candidate).free
        except OSError:
            continue
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if free < 1000 or unit == "TB":
                return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
            free /= 1000
    return "unknown space"
