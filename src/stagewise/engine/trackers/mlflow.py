"""MLflow: one MLflow run per plan run, in the experiment named by `project` (default: the plan's name).

Metrics are the same series as every tracker's (engine.trackers.tracking.series) at the plan's step:
`train/loss` over the whole plan, `stage/<stage>/train/loss` for one stage. The resolved plan is
the run's params (flattened: `stages.0.optimizer.lr`) and its `plan.yaml` artifact. Each event a
person looks for is a tag (`event.<n>.<event>` -> `<event> at step <plan step>: {fields}`) and the whole events.jsonl
an artifact; at the end the report page, `summary.json` and `exports.json` (each stage's export
directory) are artifacts.

The store: `tracking_uri` (an MLflow server http://host:5000, sqlite:///path.db, databricks,
...), else MLFLOW_TRACKING_URI, else sqlite:///RUN/mlflow.db with artifacts in RUN/mlflow-artifacts:
`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db` shows it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from stagewise.config.track_config import MlflowSettings
from stagewise.engine.trackers.tracking import RunEnd, TrackedRun, Tracker

# MLflow's limits: a param value's length and the params of one log_batch call.
_PARAM_CHARS, _BATCH = 6000, 100
_STATUS = {"complete": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def flatten(plan: Any, prefix: str = "") -> dict[str, str]:
    """{'stages': [{'optimizer': {'lr': 0.1}}]} -> {'stages.0.optimizer.lr': '0.1'}: MLflow params are flat strings."""
    if isinstance(plan, dict) and plan:
        return {k: v for key, value in plan.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(plan, list) and plan:
        return {k: v for i, value in enumerate(plan) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: json.dumps(plan) if not isinstance(plan, str) else plan}


class MlflowTracker(Tracker):
    settings: MlflowSettings

    def start(self, run: TrackedRun) -> str:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = self.settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if uri is None:
            uri = f"sqlite:///{(run.run_dir / 'mlflow.db').resolve()}"
            artifacts = (run.run_dir / "mlflow-artifacts").resolve().as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        self._run_dir = run.run_dir
        self._state = run.state
        if run.run_id is not None:
            self.run_id = run.run_id
            client.update_run(run.run_id, status="RUNNING")
            return run.run_id
        experiment = client.get_experiment_by_name(run.project)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(run.project, artifact_location=artifacts))
        tags = {"mlflow.runName": run.run_name, "stagewise.run_dir": str(run.run_dir.resolve()),
                **{tag: "" for tag in self.settings.tags}}
        self.run_id = client.create_run(experiment_id, run_name=run.run_name, tags=tags).info.run_id
        params = [Param(k, v[:_PARAM_CHARS]) for k, v in flatten(run.plan).items()]
        for i in range(0, len(params), _BATCH):
            client.log_batch(self.run_id, params=params[i:i + _BATCH])
        client.log_dict(self.run_id, run.plan, "plan.yaml")
        client.log_batch(self.run_id, tags=[RunTag("stagewise.plan", str(run.plan.get("name", "")))])
        return self.run_id

    def metric(self, record: dict[str, Any], series: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["step"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in series.items()])

    def event(self, record: dict[str, Any], step: int) -> None:
        detail = {k: v for k, v in record.items() if k not in ("event", "time")}
        n = int(self._state.get("events", 0))  # numbered: two events at one step are two tags
        self.client.set_tag(self.run_id, f"event.{n:04d}.{record['event']}",
                            f"{record['event']} at step {step}: {json.dumps(detail, default=str)}"[:5000])
        self._state["events"] = n + 1

    def finish(self, end: RunEnd) -> None:
        events = self._run_dir / "events.jsonl"
        if events.is_file():
            self.client.log_artifact(self.run_id, str(events))
        if end.report is not None:
            self.client.log_artifact(self.run_id, str(end.report))
        if end.summary:
            self.client.log_dict(self.run_id, {"stages": end.summary}, "summary.json")
        if end.exports:
            self.client.log_dict(self.run_id, end.exports, "exports.json")
        self.client.set_terminated(self.run_id, status=_STATUS[end.status])
