"""trackio: one trackio run per plan run, named by `run_name` (default: the run directory's name),
in the project `project` (default: the plan's name).

Metrics are every tracker's series (engine.trackers.tracking.series) at the plan's step; events are
trackio alerts (title: the event, text: its fields) at their step; at the end the report page is
an artifact and the summary a table. The store is trackio's local one (TRACKIO_DIR, default
~/.cache/huggingface/trackio; `trackio show` opens it), or a Space with `space_id`.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from stagewise.config.track_config import TrackioSettings
from stagewise.engine.trackers.tracking import RunEnd, TrackedRun, Tracker


class TrackioTracker(Tracker):
    settings: TrackioSettings

    def start(self, run: TrackedRun) -> str:
        import trackio

        self._trackio = trackio
        name = run.run_id or run.run_name
        self.run = trackio.init(project=run.project, name=name, space_id=self.settings.space_id, config=run.plan,
                                resume="allow" if run.run_id else "never", embed=False, auto_log_cpu=False,
                                auto_log_gpu=False, capture_console=False)
        return name

    def metric(self, record: dict[str, Any], series: dict[str, float]) -> None:
        self.run.log(series, step=int(record["step"]))

    def event(self, record: dict[str, Any], step: int) -> None:
        detail = {k: v for k, v in record.items() if k not in ("event", "time")}
        with contextlib.redirect_stdout(io.StringIO()):  # trackio prints each alert; the run's console is the run's
            self.run.alert(record["event"], json.dumps(detail, default=str), level=self._trackio.AlertLevel.INFO, step=step)

    def finish(self, end: RunEnd) -> None:
        if end.summary:
            columns = list(end.summary[0])
            self.run.log({"summary": self._trackio.Table(
                columns=columns, data=[[json.dumps(r[c]) if isinstance(r[c], dict) else r[c] for c in columns]
                                       for r in end.summary])})
        if end.report is not None:
            self.run.log_artifact(end.report, name="report", type="report")
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()
