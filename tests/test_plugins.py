"""Plug-ins: tasks, model architectures, optimizers and schedules from outside the package. A file
the user names with --plugin adds a task or an architecture a plan then trains; without the flag
the plan is refused and the file is never imported. An installed package adds an optimizer and a schedule through an entry point
(importlib.metadata), each with its own settings model: a plan uses them, and their settings are
checked with the usual one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_plan, write_plan

TASK_FILE = '''
from pathlib import Path

from dataclasses import replace

from stagewise.tasks.classify import ClassifySpec
from stagewise.tasks.spec import register_task

Path(__file__).with_suffix(".imported").touch()  # proof of the import, for the test


@register_task
class Sentiment(ClassifySpec):  # a classifier with its own name and metrics
    name = "sentiment"
    traits = replace(ClassifySpec.traits, family="sentiment", metrics=("val_loss", "train_loss", "val_accuracy"))
'''

ARCH_FILE = '''
from pathlib import Path
from typing import Annotated

from pydantic import Field
from torch import nn

from stagewise import register_arch
from stagewise.config.plan_config import ArchSettings

Path(__file__).with_suffix(".imported").touch()  # proof of the import, for the test


class BagSettings(ArchSettings):
    dim: Annotated[int, Field(ge=1, le=512)] = 16
    """Width of the word embeddings."""


@register_arch("bag", BagSettings, kind="classify")
class BagOfWords(nn.Module):
    """The mean of a text's word embeddings (padding left out) -> a linear layer to the classes."""

    def __init__(self, *, num_classes, vocab_size, dim=16):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.out = nn.Linear(dim, num_classes)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.embed(input_ids))
'''

PLUGIN_PACKAGE = '''
from typing import Annotated

import torch
from pydantic import Field

from stagewise.config.optimizer_config import OptimizerSettings, ScheduleSettings
from stagewise.config.registry import register_optimizer, register_schedule


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(buffer), buffer = beta * buffer + grad (signSGD with momentum)."""

    def __init__(self, groups, lr, beta):
        super().__init__(groups, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["beta"]).add_(p.grad)
                p.add_(buf.sign(), alpha=-group["lr"])


class SignSgdSettings(OptimizerSettings):
    beta: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


@register_optimizer("signsgd", SignSgdSettings)
def build(groups, settings):
    return SignSGD(groups, lr=settings["lr"], beta=settings["beta"])


class HalvingSettings(ScheduleSettings):
    every: Annotated[int, Field(ge=1)] | None = None  # required


def halving_problems(settings, total):
    return [("every", f"must be < steps (got {settings['every']} >= {total})")] if settings["every"] >= total else []


@register_schedule("halving", HalvingSettings, problems=halving_problems)
def halving(settings, step, total, peak):
    return peak * 0.5 ** (step // settings["every"])
'''


def _stagewise(*argv: str, path: list[Path] = ()) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own: registries start empty of plug-ins, as a user's would."""
    extra = os.pathsep.join(str(p) for p in path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (extra, os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "stagewise", *argv], env=env, capture_output=True, text=True,
                          timeout=600)


def _events(run: Path, name: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == name]


def _metrics(run: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_a_task_from_a_file_trains_with_the_opt_in_and_is_refused_without(tmp_path: Path) -> None:
    task_file = tmp_path / "elsewhere" / "sentiment_task.py"
    task_file.parent.mkdir()
    task_file.write_text(TASK_FILE, encoding="utf-8")
    labeled = tmp_path / "labeled.tsv"
    labeled.write_text("".join(f"{'pos' if i % 2 else 'neg'}\tthe film was {'good' if i % 2 else 'bad'} {i}\n"
                               for i in range(60)), encoding="utf-8")
    plan = {"name": "plug-task", "seed": 0, "precision": "fp32", "threads": 1,
            "model": {"arch": "bigru", "embed_dim": 8, "hidden": 8, "dense": 8},
            "tokenizer": {"kind": "word"}, "data": {"train": str(labeled), "field": 1, "label": 0},
            "stages": [{"name": "s", "task": "sentiment", "optimizer": {"name": "adam", "lr": 1e-2}, "epochs": 3,
                        "batch": {"size": 8}, "until": {"target": {"metric": "val_accuracy", "value": 1.0,
                                                                   "mode": "max"}}}]}
    path = write_plan(tmp_path, plan)
    where = ["--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]

    refused = _stagewise("train", str(path), *where)
    assert (refused.returncode, refused.stderr) == (2, f"error: {path}: stages[0].task: input should be 'causal_lm', "
                                                       "'sft', 'classify', 'seq2seq', 'tag', 'python' (got 'sentiment')\n")
    assert not task_file.with_suffix(".imported").exists()  # the plan alone imported nothing
    assert not (tmp_path / "run").exists()

    done = _stagewise("train", str(path), *where, "--plugin", str(task_file))
    assert done.returncode == 0, done.stderr
    assert task_file.with_suffix(".imported").exists()
    assert _metrics(tmp_path / "run", "eval")[-1]["val_accuracy"] == 1.0  # the words say the label
    # the trained stage is used with the plug-in too
    evaluated = _stagewise("evaluate", str(tmp_path / "run"), "--data", str(labeled), "--json",
                           "--plugin", str(task_file))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] > 0.9  # its training rows too: far above chance (0.5)


def test_a_missing_plugin_is_one_line(tmp_path: Path, corpus: Path) -> None:
    path = write_plan(tmp_path, tiny_plan(corpus, [{"name": "s", "optimizer": {"name": "adam", "lr": 1e-3},
                                                    "steps": 2}]))
    for plugin, message in [("no_such_pkg.tasks", "no module named 'no_such_pkg'"),
                            (str(tmp_path / "gone.py"), "no such file")]:
        done = _stagewise("check", str(path), "--plugin", plugin)
        assert (done.returncode, done.stderr) == (2, f"error: --plugin {plugin}: {message}\n")


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A package with a `stagewise.plugins` entry point, installed as a directory on sys.path."""
    site = tmp_path / "site"
    (site / "signplug").mkdir(parents=True)
    (site / "signplug" / "__init__.py").write_text(PLUGIN_PACKAGE, encoding="utf-8")
    info = site / "signplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: signplug\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[stagewise.plugins]\nsignplug = signplug\n", encoding="utf-8")
    return site


def test_an_installed_plugin_adds_an_optimizer_and_a_schedule(tmp_path: Path, corpus: Path, installed: Path) -> None:
    stage = {"name": "s", "optimizer": {"name": "signsgd", "lr": 2e-3, "beta": 0.5},
             "schedule": {"name": "halving", "every": 8}, "steps": 24, "eval": {"every": 12, "batches": 4}}
    path = write_plan(tmp_path, tiny_plan(corpus, [stage], threads=1))
    done = _stagewise("train", str(path), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
                      path=[installed])
    assert done.returncode == 0, done.stderr
    (start,) = _events(tmp_path / "run", "stage_start")
    assert (start["optimizer"], start["settings"], start["schedule"]) == ("signsgd", {"lr": 2e-3, "beta": 0.5}, "halving")
    train = _metrics(tmp_path / "run", "train")
    assert [m["lr"] for m in train] == [pytest.approx(2e-3 * 0.5 ** ((m["stage_step"] - 1) // 8)) for m in train]
    evals = [m["val_loss"] for m in _metrics(tmp_path / "run", "eval")]
    assert evals[-1] < evals[0]  # it trains

    # without the package on the path, the plan names an optimizer nobody registered
    missing = _stagewise("check", str(path))
    assert missing.returncode == 2 and "stages[0].optimizer.name: input should be 'gd', 'sgd'" in missing.stderr


@pytest.mark.parametrize(("optimizer", "schedule", "message"), [
    ({"name": "signsgd", "lr": 1e-3, "betta": 0.5}, {"name": "halving", "every": 4},
     "stages[0].optimizer.betta: unknown key (did you mean 'beta'?)"),
    ({"name": "signsgd", "lr": 1e-3, "beta": 1.5}, {"name": "halving", "every": 4},
     "stages[0].optimizer.beta: input should be less than 1 (got 1.5)"),
    ({"name": "signsgd", "lr": 1e-3, "momentum": 0.9}, {"name": "halving", "every": 4},
     "stages[0].optimizer.momentum: not a setting of optimizer 'signsgd' (it takes: beta, lr)"),
    ({"name": "adam", "lr": 1e-3, "beta": 0.5}, {"name": "constant"},
     "stages[0].optimizer.beta: not a setting of optimizer 'adam' (it takes: betas, eps, lr, weight_decay)"),
    ({"name": "signsgd", "lr": 1e-3}, {"name": "halving", "evry": 4},
     "stages[0].schedule.evry: unknown key (did you mean 'every'?)"),
    ({"name": "signsgd", "lr": 1e-3}, {"name": "halving"}, "stages[0].schedule.every: required by schedule 'halving'"),
    ({"name": "signsgd", "lr": 1e-3}, {"name": "halving", "every": 40},
     "stages[0].schedule.every: must be < steps (got 40 >= 10)"),
])
def test_a_plugins_settings_are_checked_like_stagewises_own(tmp_path: Path, corpus: Path, installed: Path,
                                                            optimizer: dict[str, Any], schedule: dict[str, Any],
                                                            message: str) -> None:
    stage = {"name": "s", "optimizer": optimizer, "schedule": schedule, "steps": 10}
    path = write_plan(tmp_path, tiny_plan(corpus, [stage]))
    done = _stagewise("check", str(path), "--cache", str(tmp_path / "cache"), path=[installed])
    assert (done.returncode, done.stderr) == (2, f"error: {path}: {message}\n")


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path: Path, corpus: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text(textwrap.dedent("""
        raise RuntimeError("this plug-in needs a GPU")
    """), encoding="utf-8")
    path = write_plan(tmp_path, tiny_plan(corpus, [{"name": "s", "optimizer": {"name": "adam", "lr": 1e-3},
                                                    "steps": 2}]))
    done = _stagewise("check", str(path), "--plugin", str(broken))
    assert (done.returncode, done.stderr) == (2, f"error: --plugin {broken}: RuntimeError: this plug-in needs a GPU\n")


def _bag_plan(tmp_path: Path, **model: Any) -> tuple[Path, Path]:
    """A classify plan on the plug-in architecture `bag`, and its labeled file."""
    labeled = tmp_path / "labeled.tsv"
    labeled.write_text("".join(f"{'pos' if i % 2 else 'neg'}\tthe film was {'good' if i % 2 else 'bad'} {i}\n"
                               for i in range(60)), encoding="utf-8")
    plan = {"name": "plug-arch", "seed": 0, "precision": "fp32", "threads": 1, "model": {"arch": "bag", **model},
            "tokenizer": {"kind": "word"}, "data": {"train": str(labeled), "field": 1, "label": 0},
            "stages": [{"name": "s", "task": "classify", "optimizer": {"name": "adam", "lr": 3e-2}, "epochs": 4,
                        "batch": {"size": 8}, "eval": {"every": 7}}]}
    return write_plan(tmp_path, plan), labeled


def test_an_arch_from_a_file_trains_with_the_opt_in_and_is_refused_without(tmp_path: Path) -> None:
    arch_file = tmp_path / "elsewhere" / "bag_arch.py"
    arch_file.parent.mkdir()
    arch_file.write_text(ARCH_FILE, encoding="utf-8")
    path, labeled = _bag_plan(tmp_path, dim=8)
    where = ["--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]

    refused = _stagewise("train", str(path), *where)
    assert (refused.returncode, refused.stderr) == (2, f"error: {path}: model.arch: 'bag' is neither a built-in model "
                                                       "nor a transformers architecture with a sequence-classification "
                                                       "head\n")
    assert not arch_file.with_suffix(".imported").exists()  # the plan alone imported nothing

    done = _stagewise("train", str(path), *where, "--plugin", str(arch_file))
    assert done.returncode == 0, done.stderr
    evals = _metrics(tmp_path / "run", "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_accuracy"] == 1.0  # the words say the label
    # the export is rebuilt by the plug-in's model
    evaluated = _stagewise("evaluate", str(tmp_path / "run"), "--data", str(labeled), "--json",
                           "--plugin", str(arch_file))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] > 0.9


@pytest.mark.parametrize(("model", "message"), [
    ({"dims": 8}, "model.dims: not a setting of bag (it takes: dim) (did you mean 'dim'?)"),
    ({"dim": 0}, "model.dim: must be in 1..16,777,216 (got 0)"),
    ({"dim": 1024}, "model.dim: input should be less than or equal to 512 (got 1024)"),
    ({"dim": "wide"}, "model.dim: must be an integer (got 'wide')"),
])
def test_a_plugin_archs_settings_are_checked_in_one_line(tmp_path: Path, model: dict[str, Any], message: str) -> None:
    arch_file = tmp_path / "bag_arch.py"
    arch_file.write_text(ARCH_FILE, encoding="utf-8")
    path, _ = _bag_plan(tmp_path, **model)
    done = _stagewise("check", str(path), "--cache", str(tmp_path / "cache"), "--plugin", str(arch_file))
    assert (done.returncode, done.stderr) == (2, f"error: {path}: {message}\n")


def test_an_arch_registered_by_decorator_trains_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stagewise
    from stagewise.config.plan_config import ArchSettings
    from stagewise.config.registry import ARCHS

    monkeypatch.setattr(ARCHS, "_entries", dict(ARCHS))  # the test's registration ends with it

    class WideSettings(ArchSettings):
        width: int = 4

    @stagewise.register_arch("wide", WideSettings, kind="classify")
    def wide(*, num_classes: int, vocab_size: int, width: int = 4) -> torch.nn.Module:
        """A linear classifier of the mean word embedding, built by a function."""
        embed = torch.nn.EmbeddingBag(vocab_size, width, mode="mean", padding_idx=0)
        return _Classifier(embed, torch.nn.Linear(width, num_classes))

    assert ARCHS["wide"].models["classify"].build is wide
    path, _ = _bag_plan(tmp_path, width=8)
    plan = stagewise.Plan.from_yaml(path, overrides=["model.arch=wide"])
    run = stagewise.train(plan, out=str(tmp_path / "run"), cache=str(tmp_path / "cache"))
    evals = run.stages["s"].evals
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert run.generate("the film was good 7").startswith("pos")  # the export, rebuilt through the registry


class _Classifier(torch.nn.Module):
    def __init__(self, embed: torch.nn.Module, out: torch.nn.Module) -> None:
        super().__init__()
        self.embed, self.out = embed, out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.embed(input_ids))
