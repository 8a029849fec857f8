"""The study's runs as jobs: a plan file written into the job's folder and trained there with the
`stagewise train` command line (the public interface; the stage cache in the folder makes a job
run again resume, or reuse every finished stage), and what each run's events.jsonl says about
its stages."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stagewise.engine.run_logs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class Job:
    """One plan to train: `name` is its folder under the work directory."""

    name: str
    plan: dict[str, Any]

    def folder(self, work: Path) -> Path:
        return work / self.name

    def run(self, work: Path) -> tuple[int, float]:
        """Train (or resume) the plan; the exit code and the seconds it took. Output goes to train.log."""
        folder = self.folder(work)
        folder.mkdir(parents=True, exist_ok=True)
        plan = folder / "plan.yaml"
        plan.write_text(yaml.safe_dump(self.plan, sort_keys=False), encoding="utf-8")
        started = time.perf_counter()
        with (folder / "train.log").open("a", encoding="utf-8") as log:
            code = subprocess.call([sys.executable, "-m", "stagewise", "train", str(plan), "--out",
                                    str(folder / "run"), "--cache", str(folder / "cache")],
                                   stdout=log, stderr=subprocess.STDOUT)
        return code, time.perf_counter() - started


def example(name: str, data: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """examples/NAME.yaml with its data files taken from `data` (by file name) and `changes`
    merged in (a mapping merges key by key; a stage list is given whole)."""
    plan = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    plan["data"]["train"] = str(data / Path(plan["data"]["train"]).name)
    return _merged(plan, changes)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class StageResult:
    """A stage as its run logged it (so far, when not `finished`). `trained_tokens`: what this run trained of it (0 when the
    stage cache supplied it); `path_tokens`: the tokens along its path from the initial weights,
    from the last train metric (a merge's: its parent's)."""

    name: str
    parent: str | None
    start_step: int
    steps: int
    tokens: int
    trained_tokens: int
    seconds: float
    final: dict[str, float]
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    path_tokens: int | None = None
    finished: bool = True


def read_run(run: Path) -> dict[str, StageResult]:
    """The stages of the run in `run` that finished (`finished`) or evaluated so far (empty when
    it has not started). A stage logged twice (trained, then reused by a later invocation) keeps
    what its training logged."""
    events_path = run / "events.jsonl"
    if not events_path.is_file():
        return {}
    events = read_jsonl(events_path)
    layout = {s["name"]: s for e in events if e["event"] == "plan_start" for s in e["stages"]}
    trained: dict[str, bool] = {}
    evals: dict[str, list[tuple[int, dict[str, float]]]] = {}
    done: dict[str, StageResult] = {}
    for e in events:
        stage = e.get("stage")
        if e["event"] == "stage_start":
            trained[stage] = True
            # a resumed stage goes on from a checkpoint: what it evaluated after that is logged again
            evals[stage] = [x for x in evals.get(stage, []) if x[0] <= e["stage_step"]]
        elif e["event"] == "eval":
            metrics = {k: v for k, v in e.items() if k.startswith("val_") and isinstance(v, float)}
            evals.setdefault(stage, []).append((e["step"] - layout[stage]["start_step"], metrics))
        elif e["event"] == "stage_end" or (e["event"] == "stage_reused" and stage not in done):
            info = layout[stage]
            final = evals[stage][-1][1] if evals.get(stage) else {}
            done[stage] = StageResult(
                name=stage, parent=info["parent"], start_step=info["start_step"], steps=info["steps"],
                tokens=e["tokens"], trained_tokens=e["tokens"] if trained.get(stage) else 0,
                seconds=e.get("seconds", 0.0), final={**final, "val_loss": e["val_loss"]},
                evals=list(evals.get(stage, [])))
    last_tokens: dict[str, int] = {}
    metrics_path = run / "metrics.jsonl"
    for m in read_jsonl(metrics_path) if metrics_path.is_file() else []:
        if m.get("kind") == "train" and "tokens" in m:
            last_tokens[m["stage"]] = m["tokens"]
    for result in done.values():
        result.path_tokens = last_tokens.get(result.name)
    unfinished = {name: StageResult(name=name, parent=layout[name]["parent"], start_step=layout[name]["start_step"],
                                    steps=layout[name]["steps"], tokens=0, trained_tokens=0, seconds=0.0, final={},
                                    evals=curve, finished=False)
                  for name, curve in evals.items() if name not in done}
    return {**done, **unfinished}


def read_job(folder: Path) -> dict[str, StageResult]:
    """The stages of every run in the job's folder (`run`, and any other `*run` sharing its stage
    cache: a stage trained there is only reused by the others): per stage, the run that trained
    it, else one that finished it, else one where it is in progress."""
    best: dict[str, StageResult] = {}
    for run in sorted(folder.glob("*run")):
        for name, result in read_run(run).items():
            rank = (result.finished and result.trained_tokens > 0, result.finished)
            held = best.get(name)
            if held is None or rank > (held.finished and held.trained_tokens > 0, held.finished):
                best[name] = result
    return best


def run_span(run: Path) -> tuple[float, float] | None:
    """The wall-clock times of the run's first and last events (over every invocation)."""
    path = run / "events.jsonl"
    times = [e["time"] for e in read_jsonl(path)] if path.is_file() else []
    return (min(times), max(times)) if times else None
