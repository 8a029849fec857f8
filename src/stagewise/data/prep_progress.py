"""A progress bar for long data preparation: characters done, their rate and the time left.

Shown on stderr when it is a terminal and the work is large (MIN_CHARS): a small corpus is
prepared in a blink, and a log file should not fill with redraws.
"""

from __future__ import annotations

import sys
from types import TracebackType

MIN_CHARS = 32 << 20


class Progress:
    def __init__(self, what: str, total: int) -> None:
        self._bar = None
        if total >= MIN_CHARS and sys.stderr.isatty():
            from rich import progress  # only a long preparation pays for the import
            from rich.console import Console

            self._bar = progress.Progress(
                progress.TextColumn(what), progress.BarColumn(), progress.DownloadColumn(binary_units=True),
                progress.TransferSpeedColumn(), progress.TimeRemainingColumn(), transient=True,
                console=Console(stderr=True))
            self._task = self._bar.add_task(what, total=total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, chars: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, chars)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

