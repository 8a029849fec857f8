"""The run's logs mirrored into TensorBoard event files, so `tensorboard --logdir runs/` shows them.

metrics.jsonl stays the record the report reads; this is a view of it, in the run directory
(RUN/tensorboard/): a write that fails there is the run's own disk failing, so it stops the run
as any write of the run does (`fatal`), where another tracker's failure is a warning.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagewise.engine.trackers.tracking import RunEnd, TrackedRun, Tracker
from stagewise.errors import WriteFailed

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class TensorBoardTracker(Tracker):
    """Called at log intervals only; SummaryWriter queues and writes from its own thread, which
    hands a failed write (a full disk) to the next call: raised here as a WriteFailed.

    The writer is made at the first metrics line (or at the end): importing it (torch.utils.tensorboard
    pulls in tensorboard) and opening the event file are off the path from the command to the first
    update. Events logged before then are held and written, in order, when it is made."""

    fatal = True

    _log_dir: Path
    _writer: SummaryWriter | None = None
    _held: list[tuple[dict[str, Any], int]]

    def start(self, run: TrackedRun) -> str:
        self._log_dir = run.run_dir / "tensorboard"
        self._held = []
        return str(self._log_dir)

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_thread_failures()
            # flush every 10 s rather than 120: a killed run keeps nearly all of its curves
            self._writer = SummaryWriter(log_dir=str(self._log_dir), flush_secs=10)
            held, self._held = self._held, []
            for record, step in held:
                self.event(record, step)
        return self._writer

    def metric(self, record: dict[str, Any], series: dict[str, float]) -> None:
        with self._guarded():
            writer = self._open()
            for tag, value in series.items():
                writer.add_scalar(tag, value, global_step=int(record["step"]))

    def event(self, record: dict[str, Any], step: int) -> None:
        if self._writer is None:
            self._held.append((record, step))
            return
        fields = {k: v for k, v in record.items() if k not in ("event", "time")}
        text = f"**{record['event']}** `{json.dumps(fields, default=str)}`"
        with self._guarded():
            self._writer.add_text(f"events/{record['event']}", text, global_step=step)

    def finish(self, end: RunEnd) -> None:
        with self._guarded():
            self._open().close()  # flushes

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise WriteFailed(self._log_dir, e) from None


def _quiet_writer_thread_failures() -> None:
    """SummaryWriter's thread hands a failed write to the writer's next call, which raises it here as
    a WriteFailed, and then dies re-raising it: that thread's traceback would be a second, raw report
    of the one failure. Other threads' exceptions reach the hook that was there before."""
    previous = threading.excepthook
    if getattr(previous, "stagewise_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)

    hook.stagewise_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook
