"""Experiment trackers on the real libraries: a 3-stage plan logged to W&B (offline) and MLflow
(a local SQLite store), read back with each library's own reader, whole and killed + resumed;
a missing extra; a tracker failing mid-run; the `track:` key."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_plan, write_plan

from stagewise.api.read_runs import report as run_report
from stagewise.cli import main
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.engine.trackers.mlflow import flatten
from stagewise.engine.trackers.tracking import QUIET, branches, series
from stagewise.errors import RunStopped
from stagewise.plan.load import load_plan

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="the wandb extra")
mlflow_tracking = pytest.importorskip("mlflow.tracking", reason="the mlflow extra")

STAGES = [
    {"name": "warm", "optimizer": {"name": "adamw", "lr": 3e-3}, "schedule": {"name": "warmup_constant", "warmup": 4},
     "steps": 12, "eval": {"every": 6}},
    {"name": "sgd", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "steps": 12},
    {"name": "cool", "optimizer": {"name": "adamw", "lr": 1e-3, "handoff": "reset"},
     "schedule": {"name": "cosine", "min_lr": 1e-4}, "steps": 8},
]
TRACK = [{"wandb": {"project": "tracked", "tags": ["test"]}}, {"mlflow": {"project": "tracked"}}]


def _run(tmp: Path, corpus: Path, tag: str, stop_after: int | None = None, track: Any = TRACK) -> Path:
    path = write_plan(tmp, tiny_plan(corpus, STAGES, track=track, checkpoint={"every": 4}, log={"every": 2}),
                      f"{tag}.yaml")
    train(prepare(load_plan(path), path, tmp / "cache"), tmp / tag, stop_after=stop_after, report=run_report)
    return tmp / tag


# --- reading W&B's offline run files: its records (LevelDB log format, protobuf records) ----------

def _wandb_records(path: Path) -> list[Any]:
    """Every record of a .wandb file: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: full/first/middle/last)."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _wandb_run(run_dir: Path) -> tuple[set[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """The run ids, the config of each session and the history rows of all sessions (a resumed
    run writes one offline run folder per session), in the order W&B numbered them."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    ids, configs, rows = set(), [], []
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                configs.append(_items(record.run.config.update))
            elif kind == "history":
                rows.append(_items(record.history.item))
    return ids, configs, sorted(rows, key=lambda r: r["_step"])


def _mlflow_run(run_dir: Path) -> Any:
    client = mlflow_tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert len(runs) == 1, "one MLflow run per plan run"
    return client, runs[0]


def _expected_points(run_dir: Path) -> list[tuple[int, str, str, float]]:
    """(plan step, stage, series name, value) of every number of every metrics.jsonl line."""
    return [(m["step"], m["stage"], name, value) for m in read_jsonl(run_dir / "metrics.jsonl")
            for name, value in series(m).items() if not name.startswith("stage/")]


def _check_wandb(run_dir: Path, sessions: int) -> None:
    ids, configs, rows = _wandb_run(run_dir)
    assert len(ids) == 1 and len(configs) == sessions
    plan = yaml.safe_load((run_dir / "plan.yaml").read_text())
    assert all({k: v for k, v in config.items() if k != "_wandb"} == plan for config in configs)
    assert [r["_step"] for r in rows] == list(range(len(rows))), "W&B's row numbers go on across sessions"
    # every number of every metrics line, at its plan step with its stage, once
    got = [(r["plan_step"], r["stage"], k, v) for r in rows if "event" not in r
           for k, v in r.items() if "/" in k and not k.startswith(("stage/", "events"))]
    want = _expected_points(run_dir)
    assert sorted(got, key=str) == sorted(want, key=str)  # JSON and float64 both keep the value exactly
    assert len({(step, stage, name) for step, stage, name, _ in got}) == len(got), "a step logged twice"
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] not in QUIET]
    assert [r["event"] for r in rows if "event" in r] == events
    assert rows[-1]["events/_type"] == "table-file" and rows[-1]["events/nrows"] == len(read_jsonl(run_dir / "events.jsonl"))


def _check_mlflow(run_dir: Path) -> None:
    client, run = _mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    plan = yaml.safe_load((run_dir / "plan.yaml").read_text())
    assert run.data.params == flatten(plan)
    assert yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "plan.yaml")).read_text()) == plan
    want = _expected_points(run_dir)
    for name in {n for _, _, n, _ in want}:
        history = client.get_metric_history(run.info.run_id, name)
        points = [(step, v) for step, _, n, v in want if n == name]
        assert sorted((m.step, m.value) for m in history) == sorted(points), name
    for stage in {s["name"] for s in STAGES}:  # each point with its stage
        history = client.get_metric_history(run.info.run_id, f"stage/{stage}/train/loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [
            step for step, s, n, _ in want if s == stage and n == "train/loss"]
    events = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] not in QUIET]
    tags = sorted((k, v) for k, v in run.data.tags.items() if k.startswith("event."))
    assert [k.split(".", 2)[2] for k, _ in tags] == [e["event"] for e in events]
    assert all(v.startswith(f"{e['event']} at step {e['step']}: ") for (_, v), e in zip(tags, events) if "step" in e)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plan.yaml", "events.jsonl", "report.html", "summary.json", "exports.json"} <= artifacts
    exports = json.loads(Path(client.download_artifacts(run.info.run_id, "exports.json")).read_text())
    assert exports == {s["name"]: str(run_dir / "stages" / s["name"]) for s in STAGES}
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json")).read_text())
    assert [row["stage"] for row in summary["stages"]] == ["warm", "sgd", "cool"]


def test_a_three_stage_run_in_wandb_and_mlflow(tmp_path: Path, corpus: Path) -> None:
    run_dir = _run(tmp_path, corpus, "whole")
    _check_wandb(run_dir, sessions=1)
    _check_mlflow(run_dir)


def test_killed_and_resumed_continues_the_same_tracker_runs(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(RunStopped):
        _run(tmp_path, corpus, "cut", stop_after=18)  # in the second stage, 2 steps after its checkpoint at 16
    _, run = _mlflow_run(tmp_path / "cut")
    assert run.info.status == "KILLED"
    logged = [m for m in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if m["step"] > 16]
    assert logged, "the lines the resumed stage logs again"
    run_dir = _run(tmp_path, corpus, "cut")
    _check_wandb(run_dir, sessions=2)
    _check_mlflow(run_dir)


def test_a_missing_extra_is_one_line_before_anything_trains(tmp_path: Path, corpus: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` fails
    path = write_plan(tmp_path, tiny_plan(corpus, STAGES, track=["mlflow", "wandb"]))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: track[1]: tracker 'wandb' needs the wandb package, which cannot be imported: " \
                  "pip install 'stagewise[wandb]'\n"
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "mlflow.db").exists()


def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_completes(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = mlflow_tracking.MlflowClient.log_batch, {"n": 0}

    def log_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("metrics"):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow_tracking.MlflowClient, "log_batch", log_batch)
    path = write_plan(tmp_path, tiny_plan(corpus, STAGES, track=TRACK, log={"every": 2}))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["warning: tracker mlflow failed at metric (OSError: [Errno 28] No space left on device); "
                        "the run goes on without it"]
    assert [e["event"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")][-1] == "plan_end"
    _check_wandb(tmp_path / "run", sessions=1)  # the other tracker got everything
    _, run = _mlflow_run(tmp_path / "run")
    assert run.info.status == "RUNNING", "left as it was when it failed"


# --- the plan key -----------------------------------------------------------------------------------

def test_track_key_forms_errors_and_round_trip(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    track = ["tensorboard", {"wandb": {"project": "p", "mode": "online", "tags": ["a"]}},
             {"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}}, {"trackio": None}]
    plan = load_plan(write_plan(tmp_path, tiny_plan(corpus, STAGES, track=track)))
    assert [t.name for t in plan.track] == ["tensorboard", "wandb", "mlflow", "trackio"]
    assert plan.track[1].settings.model_dump() == {"project": "p", "run_name": None, "tags": ["a"], "mode": "online",
                                                   "entity": None}
    dumped = plan.model_dump(mode="json", by_alias=True, exclude_none=True)["track"]
    assert load_plan(write_plan(tmp_path, tiny_plan(corpus, STAGES, track=dumped), "again.yaml")) == plan
    default = load_plan(write_plan(tmp_path, tiny_plan(corpus, STAGES), "default.yaml"))
    assert [t.name for t in default.track] == ["tensorboard"]
    for bad, message in [(["wandbb"], "track[0].wandbb: unknown key (did you mean 'wandb'?)"),
                         ([{"wandb": {"projekt": "p"}}], "track[0].wandb.projekt: unknown key (did you mean 'project'?)"),
                         ([{"mlflow": {"mode": "offline"}}], "track[0].mlflow.mode: unknown key"),
                         ([{"tensorboard": {"project": "p"}}], "track[0].tensorboard.project: unknown key"),
                         ([{"mlflow": {}, "wandb": {}}], "track[0]: one tracker per entry (got 2)"),
                         (["mlflow", "mlflow"], "track[1]: 'mlflow' is named twice")]:
        path = write_plan(tmp_path, tiny_plan(corpus, STAGES, track=bad), "bad.yaml")
        assert main(["check", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err


def test_branches_get_their_own_line() -> None:
    """A branch overlaps the trunk's steps: its plan-axis series are prefixed by where it left the trunk."""
    stages = [{"name": "a", "parent": None}, {"name": "b", "parent": "a"}, {"name": "c", "parent": "b"},
              {"name": "x", "parent": "a"}, {"name": "y", "parent": "x"}, {"name": "z", "parent": "b"}]
    assert branches(stages) == {"a": None, "b": None, "c": None, "x": "x", "y": "x", "z": "z"}
    assert series({"kind": "train", "step": 3, "stage": "y", "stage_step": 1, "loss": 2.0}, "x") == {
        "x/train/loss": 2.0, "stage/y/train/loss": 2.0}


def test_the_python_api_takes_the_trackers(tmp_path: Path, corpus: Path) -> None:
    import stagewise

    plan = tiny_plan(corpus, [{**STAGES[0], "steps": 6, "eval": {"every": 6}}])  # the default: tensorboard only
    run = stagewise.train(plan, out=tmp_path / "run", cache=tmp_path / "cache", track=[{"mlflow": {"project": "tracked"}}])
    client, tracked = _mlflow_run(run.path)
    assert tracked.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "train/loss")] == [
        m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert not (tmp_path / "run" / "tensorboard").exists()  # `track` replaced the plan's


def test_the_example_plan_is_valid() -> None:
    """examples/trackers/tracked.yaml (what the docs' screenshot script trains) loads as a plan."""
    plan = load_plan(Path(__file__).resolve().parents[1] / "examples" / "trackers" / "tracked.yaml")
    assert [t.name for t in plan.track] == ["tensorboard", "wandb", "mlflow"] and len(plan.stages) == 3
