"""Weights & Biases: one W&B run per plan run.

Every metrics line is one history row holding its numbers (engine.trackers.tracking.series), its
`plan_step` and its `stage`; every chart is drawn over `plan_step` (define_metric), so the whole
plan is one axis even where branches and rollbacks go back in steps. W&B's own row counter
(`_step`) only grows: it is kept in RUN/trackers.json, so a resumed run continues it and
`wandb sync --append` puts both sessions' rows into one run. Events are rows too (`event`,
`event_detail`); at the end the run gets an `events` and a `summary` table, the report page and
each stage's export path.

mode offline (the default): the run is written under RUN/wandb/; `wandb sync --append
RUN/wandb/offline-run-*` uploads it later. mode online: to the server that `wandb login` (or
WANDB_API_KEY, WANDB_BASE_URL for a self-hosted server) names.
"""

from __future__ import annotations

import json
from typing import Any

from stagewise.config.track_config import WandbSettings
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.trackers.tracking import RunEnd, TrackedRun, Tracker


class WandbTracker(Tracker):
    settings: WandbSettings

    def start(self, run: TrackedRun) -> str:
        import wandb

        self._wandb = wandb
        self._state = run.state
        self._run_dir = run.run_dir
        self.run = wandb.init(
            project=run.project, entity=self.settings.entity, name=run.run_name, tags=self.settings.tags or None,
            config=run.plan, id=run.run_id, resume="allow" if run.run_id else None, dir=str(run.run_dir),
            mode=self.settings.mode,
            # several runs in one process (a search, a test) each get their own; the training
            # process's stdout and machine stats stay out of it
            settings=wandb.Settings(reinit="create_new", console="off", silent=True, x_disable_stats=True),
        )
        self.run.define_metric("plan_step")
        self.run.define_metric("*", step_metric="plan_step")
        return str(self.run.id)

    def _log(self, row: dict[str, Any]) -> None:
        step = int(self._state.get("row", 0))
        self.run.log(row, step=step)
        self._state["row"] = step + 1

    def metric(self, record: dict[str, Any], series: dict[str, float]) -> None:
        self._log({**series, "plan_step": record["step"], "stage": record.get("stage")})

    def event(self, record: dict[str, Any], step: int) -> None:
        detail = {k: v for k, v in record.items() if k not in ("event", "time")}
        self._log({"plan_step": step, "stage": record.get("stage"), "event": record["event"],
                   "event_detail": json.dumps(detail, default=str)})

    def finish(self, end: RunEnd) -> None:
        wandb = self._wandb
        events = read_jsonl(self._run_dir / "events.jsonl")
        self._log({"events": wandb.Table(
            columns=["time", "event", "stage", "step", "detail"],
            data=[[e.get("time"), e.get("event"), e.get("stage"), e.get("step"),
                   json.dumps({k: v for k, v in e.items() if k not in ("time", "event", "stage", "step")}, default=str)]
                  for e in events])})
        if end.summary:
            columns = list(end.summary[0])
            self.run.summary["stages"] = wandb.Table(
                columns=columns, data=[[json.dumps(r[c]) if isinstance(r[c], dict) else r[c] for c in columns]
                                       for r in end.summary])
        self.run.summary["status"] = end.status
        for stage, path in end.exports.items():
            self.run.summary[f"export/{stage}"] = path
        if end.report is not None:
            artifact = wandb.Artifact(f"report-{self.run.id}", type="report")
            artifact.add_file(str(end.report))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if end.status == "complete" else 1)
