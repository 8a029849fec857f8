"""The run's logs mirrored into TensorBoard event files, so `tensorboard --logdir runs/` shows them.

metrics.jsonl stays the record the report reads; this is a view of it. Every number of a metrics
line becomes a scalar on the plan's global step twice: `train/loss` (the whole plan as one curve)
and `stage/<name>/train/loss` (one stage alone). Events become text at the step they belong to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagewise.errors import WriteFailed

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# Position fields, not measurements.
_NOT_SCALARS = {"kind", "step", "stage", "stage_step"}


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The tags and values one metrics line becomes: `{"kind": "eval", "val_loss": ..}` -> `val/loss`."""
    kind = str(record.get("kind", "metric"))
    prefix = "val" if kind == "eval" else kind
    tags = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tag = f"{prefix}/{key.removeprefix(prefix + '_')}"
        tags[tag] = float(value)
        if "stage" in record:
            tags[f"stage/{record['stage']}/{tag}"] = float(value)
    return tags


class TensorBoardLog:
    """Called at log intervals only; SummaryWriter queues and writes from its own thread, which
    hands a failed write (a full disk) to the next call: raised here as a WriteFailed.

    The writer is made at the first metrics line (or at close): importing it (torch.utils.tensorboard
    pulls in tensorboard) and opening the event file are off the path from the command to the first
    update. Events logged before then are held and written, in order, when it is made."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._writer: SummaryWriter | None = None
        self._held: list[dict[str, Any]] = []
        self._step = 0  # the last global step seen: where an event without its own step goes

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # flush every 10 s rather than 120: a killed run keeps nearly all of its curves
            self._writer = SummaryWriter(log_dir=str(self._log_dir), flush_secs=10)
            held, self._held = self._held, []
            for record in held:
                self.event(record)
        return self._writer

    def metric(self, record: dict[str, Any]) -> None:
        with self._guarded():
            writer = self._open()
            self._step = int(record.get("step", self._step))
            for tag, value in scalar_tags(record).items():
                writer.add_scalar(tag, value, global_step=self._step)

    def event(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            self._held.append(record)
            return
        if isinstance(record.get("step"), int):
            self._step = record["step"]
        fields = {k: v for k, v in record.items() if k not in ("event", "time")}
        text = f"**{record['event']}** `{json.dumps(fields, default=str)}`"
        with self._guarded():
            self._writer.add_text(f"events/{record['event']}", text, global_step=self._step)

    def close(self) -> None:
        with self._guarded():
            self._open().close()  # flushes

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise WriteFailed(self._log_dir, e) from None
