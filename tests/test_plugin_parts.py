"""Plug-in callbacks and trackers, and Python objects in lr_find and search.

An installed package (a dist-info directory found through importlib.metadata) registers a
tracker and a callback, each with its own settings model: a plan names both, the run calls them
(the tracker gets every metrics line, the callback vetoes the update it was told to), and their
settings are checked with the plan's usual one-line errors. lr_find and a two-trial search run on
a plain torch module, a list of dicts and the user's loss, with the stage keys `train` uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_plan, write_plan
from rich.console import Console

import stagewise
from stagewise.errors import UserError

PLUGIN_PACKAGE = '''
import json
from typing import Annotated

from pydantic import BaseModel, Field

import stagewise


class JsonlSettings(BaseModel, extra="forbid"):
    file: str  # required
    every: Annotated[int, Field(ge=1)] = 1


@stagewise.register_tracker("jsonl", JsonlSettings)
class JsonlTracker(stagewise.Tracker):
    """Writes what it is sent to settings.file, one JSON line each."""

    def start(self, run):
        self.out = open(self.settings.file, "a", encoding="utf-8")
        self.out.write(json.dumps({"start": run.run_name}) + "\\n")
        return "jsonl-run"

    def metric(self, record, series):
        if int(record["step"]) % self.settings.every == 0:
            self.out.write(json.dumps({"metric": series, "step": record["step"]}) + "\\n")

    def event(self, record, step):
        self.out.write(json.dumps({"event": record["event"], "step": step}) + "\\n")

    def finish(self, end):
        self.out.write(json.dumps({"finish": end.status}) + "\\n")
        self.out.close()


class VetoSettings(BaseModel, extra="forbid"):
    at: Annotated[int, Field(ge=0)]


@stagewise.register_callback("veto", settings=VetoSettings)
class Veto(stagewise.Callback):
    """Vetoes update `at` of every stage (its gradients are dropped)."""

    def __init__(self, settings):
        self.at = settings.at
        self.vetoed = []

    def before_optimizer_step(self, trainer, update):
        if update.step == self.at:
            self.vetoed.append(update.step)
            trainer.run.logs.event("vetoed", stage=trainer.stage.name, stage_step=update.step)
            return False
        return None

    def state_dict(self):
        return {"vetoed": self.vetoed}

    def load_state_dict(self, state):
        self.vetoed = state["vetoed"]
'''


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "partsplug").mkdir(parents=True)
    (site / "partsplug" / "__init__.py").write_text(PLUGIN_PACKAGE, encoding="utf-8")
    info = site / "partsplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: partsplug\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[stagewise.plugins]\npartsplug = partsplug\n", encoding="utf-8")
    return site


def _stagewise(*argv: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, with the package installed (on its path) or not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "stagewise", *argv], env=env, capture_output=True, text=True,
                          timeout=600)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_plan_names_an_installed_plugins_tracker_and_callback(tmp_path: Path, corpus: Path, installed: Path) -> None:
    log = tmp_path / "tracked.jsonl"
    stage = {"name": "s", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 12, "eval": {"every": 6, "batches": 4}}
    plan = tiny_plan(corpus, [stage], threads=1, log={"every": 1},
                     track=[{"jsonl": {"file": str(log), "every": 2}}], callbacks=[{"veto": {"at": 3}}])
    path = write_plan(tmp_path, plan)
    done = _stagewise("train", str(path), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
                      path=installed)
    assert done.returncode == 0, done.stderr
    events = _lines(tmp_path / "run" / "events.jsonl")
    assert [(e["stage"], e["stage_step"]) for e in events if e["event"] == "vetoed"] == [("s", 3)]
    train = [m for m in _lines(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["stage_step"] for m in train] == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]  # update 4 vetoed: no line
    tracked = _lines(log)
    assert tracked[0] == {"start": "run"} and tracked[-1] == {"finish": "complete"}
    assert [t["step"] for t in tracked if "metric" in t and "train/loss" in t["metric"]] == [2, 6, 8, 10, 12]
    assert any(t.get("event") == "vetoed" for t in tracked)
    evals = [m["val_loss"] for m in _lines(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "eval"]
    assert evals[-1] < evals[0]

    # The callback is part of the stage key: the same one is reused, another veto step is another stage.
    for name, callbacks, status in (("same", [{"veto": {"at": 3}}], "reuse"), ("other", [{"veto": {"at": 5}}], "train"),
                                    ("none", [], "train")):
        other = write_plan(tmp_path, tiny_plan(corpus, [stage], threads=1, log={"every": 1},
                                               track=[{"jsonl": {"file": str(log), "every": 2}}], callbacks=callbacks),
                           f"{name}.yaml")
        checked = _stagewise("check", str(other), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
                             path=installed)
        assert checked.returncode == 0, checked.stderr
        (row,) = [line for line in checked.stdout.splitlines() if line.startswith("│ s ")]
        assert status in [cell.strip() for cell in row.split("│")], (name, row)


@pytest.mark.parametrize(("top", "message"), [
    ({"track": [{"jsonl": {"file": "x", "evry": 2}}]}, "track[0].jsonl.evry: unknown key (did you mean 'every'?)"),
    ({"track": [{"jsonl": {"every": 2}}]}, "track[0].jsonl.file: required"),
    ({"track": [{"jsonl": {"file": "x", "every": 0}}]},
     "track[0].jsonl.every: input should be greater than or equal to 1 (got 0)"),
    ({"track": ["jsonnl"]}, "track[0].jsonnl: unknown key (did you mean 'jsonl'?)"),
    ({"callbacks": [{"veto": {"at": -1}}]}, "callbacks[0].veto.at: input should be greater than or equal to 0 (got -1)"),
    ({"callbacks": ["veto"]}, "callbacks[0].veto.at: required"),
    ({"callbacks": [{"vetoo": {"at": 1}}]}, "callbacks[0].vetoo: unknown key (did you mean 'veto'?)"),
    ({"callbacks": [{"veto": {"at": 1}}, {"veto": {"at": 2}}]},
     "callbacks[1]: 'veto' is named twice (each callback's state is saved under its name)"),
])
def test_a_plugins_tracker_and_callback_settings_are_checked(tmp_path: Path, corpus: Path, installed: Path,
                                                              top: dict[str, Any], message: str) -> None:
    stage = {"name": "s", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 4}
    path = write_plan(tmp_path, tiny_plan(corpus, [stage], **top))
    done = _stagewise("check", str(path), "--cache", str(tmp_path / "cache"), path=installed)
    assert (done.returncode, done.stderr) == (2, f"error: {path}: {message}\n")


def test_without_the_package_a_plugins_callback_is_unknown(tmp_path: Path, corpus: Path) -> None:
    stage = {"name": "s", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 4}
    path = write_plan(tmp_path, tiny_plan(corpus, [stage], callbacks=["veto"]))
    done = _stagewise("check", str(path), "--cache", str(tmp_path / "cache"))
    assert (done.returncode, done.stderr) == (2, f"error: {path}: callbacks[0].veto: unknown key\n")


# --- lr_find and search on Python objects ------------------------------------------------------

PLAN: dict[str, Any] = {
    "name": "objects", "seed": 0, "precision": "fp32", "threads": 1,
    "defaults": {"batch": {"size": 16}, "eval": {"every": 8}},
    "stages": [{"name": "warm", "optimizer": {"name": "sgd", "lr": 0.05}, "steps": 8},
               {"name": "fit", "optimizer": {"name": "sgd", "lr": 0.05}, "steps": 8}],
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _rows(n: int = 256) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.3
    return [{"x": a.tolist(), "y": float(b)} for a, b in zip(x, y, strict=True)]


def mse(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_find_on_a_model_object_rows_and_a_loss(tmp_path: Path) -> None:
    model, rows = _model(), _rows()
    given = _weights(model)
    found = stagewise.lr_find(PLAN, "fit", start=1e-4, end=10.0, steps=30, out=tmp_path / "lr", cache=tmp_path / "cache",
                              model=model, data={"train": rows}, loss=mse, console=Console(quiet=True))
    assert len(found.lrs) >= 10 and found.lrs[0] == pytest.approx(1e-4)
    assert found.minimum is not None and 1e-4 < found.minimum * 10 <= found.lrs[-1]
    assert min(found.raw_losses) < found.raw_losses[0]  # the loss of the user's model on the rows falls
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items())  # handed back as given
    # It trained `warm` (fit's parent) under the key train uses: train reuses it.
    run = stagewise.train(PLAN, out=tmp_path / "run", cache=tmp_path / "cache", model=model, data={"train": rows},
                          loss=mse, console=Console(quiet=True))
    assert [e["stage"] for e in run.events if e["event"] == "stage_reused"] == ["warm"]


def test_a_two_trial_search_on_a_model_object_rows_and_a_loss(tmp_path: Path) -> None:
    model, rows = _model(), _rows()
    given = _weights(model)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"stages.fit.optimizer.lr": {"float": [0.01, 0.1], "log": True}}), encoding="utf-8")
    parts = {"model": model, "data": {"train": rows}, "loss": mse}

    class Counter(stagewise.Callback):
        updates = 0

        def after_update(self, trainer: Any, update: stagewise.StepState) -> None:
            Counter.updates += 1

    with pytest.raises(UserError) as refused:
        stagewise.search(PLAN, space, trials=2, workers=2, out=tmp_path / "search", **parts)
    assert str(refused.value) == ("workers: 2: objects passed from Python (model, data, loss, callbacks) live in this "
                                  "process, which other workers cannot share: search with workers=1")
    assert not (tmp_path / "search").exists()
    result = stagewise.search(PLAN, space, trials=2, out=tmp_path / "search", sampler="random", callbacks=[Counter()],
                              console=Console(quiet=True), **parts)
    assert [r.state for r in result.rows] == ["complete", "complete"]
    assert result.rows[0].params != result.rows[1].params
    # both trials started from the model as given: the second reused the first's `warm`
    assert (result.rows[0].trained, result.rows[1].reused, result.rows[1].trained) == (["warm", "fit"], ["warm"], ["fit"])
    assert Counter.updates == 8 + 8 + 8  # warm once, fit twice: the user's callback in every stage trained
    assert all(r.value is not None and r.value < 1.0 for r in result.rows)
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items())
