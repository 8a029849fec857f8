"""The run's logs mirrored into TensorBoard event files, so `tensorboard --logdir runs/` shows them.

metrics.jsonl stays the record the report reads; this is a view of it. Every number of a metrics
line becomes a scalar on the plan's global step twice: `train/loss` (the whole plan as one curve)
and `stage/<name>/train/loss` (one stage alone). Events become text at the step they belong to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from stagewise.errors import WriteFailed

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
    hands a failed write (a full disk) to the next call: raised here as a WriteFailed."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        # flush every 10 s rather than 120: a killed run keeps nearly all of its curves
        self._writer = self._guarded(lambda: SummaryWriter(log_dir=str(log_dir), flush_secs=10))
        self._step = 0  # the last global step seen: where an event without its own step goes

    def metric(self, record: dict[str, Any]) -> None:
        self._step = int(record.get("step", self._step))
        for tag, value in scalar_tags(record).items():
            self._guarded(lambda t=tag, v=value: self._writer.add_scalar(t, v, global_step=self._step))

    def event(self, record: dict[str, Any]) -> None:
        if isinstance(record.get("step"), int):
            self._step = record["step"]
        fields = {k: v for k, v in record.items() if k not in ("event", "time")}
        text = f"**{record['event']}** `{json.dumps(fields, default=str)}`"
        self._guarded(lambda: self._writer.add_text(f"events/{record['event']}", text, global_step=self._step))

    def close(self) -> None:
        self._guarded(self._writer.close)  # flushes

    def _guarded(self, call: Any) -> Any:
        try:
            return call()
        except OSError as e:
            raise WriteFailed(self.log_dir, e) from None
