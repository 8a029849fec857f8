"""The shape the features build on: one stage tree (`from:` read in one place, one-line errors),
one task registry, one optimizer hand-off path."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_plan, write_plan
from rich.console import Console

from stagewise.cli import main
from stagewise.config.registry import TASKS
from stagewise.engine import loop as trainer
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_plan import train
from stagewise.optim.optimizers import ProximalSGD
from stagewise.plan.load import load_plan
from stagewise.plan.tree import stage_tree

QUIET = Console(quiet=True)
STABLE = {"name": "stable", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 4}


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["check", "train"])
def test_a_misspelt_parent_is_one_line_with_a_suggestion(tmp_path: Path, corpus: Path, command: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path, tiny_plan(corpus, [STABLE, {"name": "cool", "from": "stabel@2", "steps": 2}]))
    argv = [command, str(path), "--cache", str(tmp_path / "cache")] + (["--out", str(tmp_path / "run")]
                                                                     if command == "train" else [])
    assert _error(capsys, *argv) == (2, f"error: {path}: stages[1].from: no stage 'stabel' (did you mean 'stable'?)\n")
    assert not (tmp_path / "run").exists()


def test_a_parent_must_come_before_its_branch(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path, tiny_plan(corpus, [{**STABLE, "name": "a"}, {"name": "b", "from": "c", "steps": 2},
                                                   {"name": "c", "steps": 2}]))
    assert _error(capsys, "check", str(path), "--cache", str(tmp_path / "cache")) == \
        (2, f"error: {path}: stages[1].from: stage 'c' comes later: a parent comes before its branches\n")


def test_a_first_stage_cannot_carry_whatever_the_last_stage_is(tmp_path: Path, corpus: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # The last stage trains a new head: the first stage's hand-off used to be checked against it.
    labeled = tmp_path / "labeled.tsv"
    labeled.write_text("".join(f"{'pos' if i % 2 else 'neg'}\tthe film was {'good' if i % 2 else 'bad'}\n"
                               for i in range(40)), encoding="utf-8")
    plan = tiny_plan(corpus, [{**STABLE, "optimizer": {"name": "adamw", "lr": 1e-3, "handoff": "carry"}},
                              {"name": "cls", "task": "classify", "steps": 2, "optimizer": {"name": "adam", "lr": 1e-3},
                               "data": {"train": str(labeled), "field": 1, "label": 0}}])
    path = write_plan(tmp_path, plan)
    assert _error(capsys, "check", str(path), "--cache", str(tmp_path / "cache")) == \
        (2, f"error: {path}: stages[0].optimizer.handoff: carry needs a parent stage (this one starts from the model "
            "as built)\n")


def test_the_tree_links_each_stage_to_its_parent(tmp_path: Path, corpus: Path) -> None:
    plan = load_plan(write_plan(tmp_path, tiny_plan(corpus, [
        STABLE, {"name": "cool", "steps": 2}, {"name": "branch", "from": "stable@2", "steps": 2},
        {"name": "base", "from": "init", "optimizer": {"name": "sgd", "lr": 0.1}, "steps": 2}])))
    nodes = stage_tree(plan)
    assert [(n.name, n.parent.name if n.parent else None, n.at, n.from_init) for n in nodes] == [
        ("stable", None, None, False), ("cool", "stable", None, False), ("branch", "stable", 2, False),
        ("base", None, None, True)]


def test_every_task_is_declared_by_its_own_module() -> None:
    """What the engine and the plan ask of a task, each task module answers for itself."""
    for name, spec in TASKS.items():
        module = inspect.getmodule(type(spec))
        assert spec.name == name and module is not None and module.__name__.startswith("stagewise.tasks.")
        assert "val_loss" in spec.traits.metrics and "train_loss" in spec.traits.metrics and spec.traits.unit in ("tokens", "examples")
    assert {n for n, s in TASKS.items() if s.traits.family == TASKS["causal_lm"].traits.family} == {"causal_lm", "sft"}


def _l1_strengths(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The L1 strength each update adds to the loss (engine.loop's call of weight_penalty)."""
    seen: list[float] = []
    real = trainer.weight_penalty

    def recording(model: torch.nn.Module, l1: float, l2: float) -> torch.Tensor | None:
        seen.append(l1)
        return real(model, l1, l2)

    monkeypatch.setattr(trainer, "weight_penalty", recording)
    return seen


@pytest.mark.parametrize(("first", "switch_to"), [("adamw", "sgd_l1"), ("sgd_l1", "adamw")])
def test_a_switch_to_or_from_sgd_l1_applies_l1_once(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                    first: str, switch_to: str) -> None:
    """sgd_l1 applies L1 by its proximal step, so while it is in use the loss carries none; any
    other optimizer gets it through the loss. A rule's switch changes which, at the switch."""
    l1 = 1e-3
    stage: dict[str, Any] = {
        "name": "s", "optimizer": {"name": first, "lr": 0.01}, "steps": 8, "regularization": {"l1": l1},
        "eval": {"every": 4, "batches": 2},
        "rules": [{"when": {"target": {"metric": "val_loss", "value": 1e9}}, "max_fires": 1,
                   "do": {"switch": {"to": switch_to, "lr": 0.01}}}]}
    path = write_plan(tmp_path, tiny_plan(corpus, [stage]))
    prepared = prepare(load_plan(path), path, tmp_path / "cache")
    seen = _l1_strengths(monkeypatch)
    captured: dict[str, Any] = {}
    real_switch = trainer.StageOptimizer.switch

    def spy(self: Any, name: str, settings: dict[str, Any], handoff: str) -> int:
        converted = real_switch(self, name, settings, handoff)
        captured["optimizer"], captured["loss_l1"] = self.optimizer, self.loss_l1
        return converted

    monkeypatch.setattr(trainer.StageOptimizer, "switch", spy)
    train(prepared, tmp_path / "run", console=QUIET)
    in_loss = 0.0 if first == "sgd_l1" else l1
    assert seen == [in_loss] * 4 + [l1 - in_loss] * 4  # the rule fires after update 4
    proximal = captured["optimizer"] if switch_to == "sgd_l1" else None
    if proximal is not None:
        assert isinstance(proximal, ProximalSGD) and captured["loss_l1"] == 0.0
        assert max(g["l1"] for g in proximal.param_groups) == l1  # the decay group; biases get none
    else:
        assert not isinstance(captured["optimizer"], ProximalSGD) and captured["loss_l1"] == l1


def test_a_switch_to_sgd_l1_without_l1_is_a_plan_error(tmp_path: Path, corpus: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stage = {**STABLE, "eval": {"every": 2}, "rules": [{"when": {"target": {"metric": "val_loss", "value": 9.0}},
                                                        "do": {"switch": {"to": "sgd_l1", "lr": 0.01}}}]}
    path = write_plan(tmp_path, tiny_plan(corpus, [stage]))
    assert _error(capsys, "check", str(path), "--cache", str(tmp_path / "cache")) == \
        (2, f"error: {path}: stages[0].rules[0].do.switch.to: sgd_l1 needs regularization.l1 > 0 (its proximal "
            "step applies it)\n")


def test_a_new_task_needs_only_its_module_and_the_registry(tmp_path: Path, corpus: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A task declared outside stagewise's own modules, put in the registry, is validated,
    resolved, trained and exported like the built-in ones: nothing else names tasks."""
    from dataclasses import replace

    from stagewise.tasks.classify import ClassifySpec

    class Sentiment(ClassifySpec):  # a "new task module": a classifier with its own name and metrics
        name = "sentiment"
        traits = replace(ClassifySpec.traits, family="sentiment", metrics=("val_loss", "train_loss", "val_accuracy"))

    monkeypatch.setitem(TASKS, "sentiment", Sentiment())
    labeled = tmp_path / "labeled.tsv"
    labeled.write_text("".join(f"{'pos' if i % 2 else 'neg'}\tthe film was {'good' if i % 2 else 'bad'} {i}\n"
                               for i in range(60)), encoding="utf-8")
    plan = {"name": "new-task", "seed": 0, "precision": "fp32", "model": {"arch": "bigru", "embed_dim": 8,
                                                                         "hidden": 8, "dense": 8},
            "tokenizer": {"kind": "word"}, "data": {"train": str(labeled), "field": 1, "label": 0},
            "stages": [{"name": "s", "task": "sentiment", "optimizer": {"name": "adam", "lr": 1e-2}, "epochs": 3,
                        "batch": {"size": 8}, "until": {"target": {"metric": "val_accuracy", "value": 1.0,
                                                                   "mode": "max"}}}]}
    path = write_plan(tmp_path, plan)
    prepared = prepare(load_plan(path), path, tmp_path / "cache")
    (summary,) = train(prepared, tmp_path / "run", console=QUIET)
    assert summary.metrics["val_accuracy"] == 1.0  # the words say the label
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(labeled), "--json"]) == 0
    bad = {**plan, "stages": [{**plan["stages"][0], "until": {"target": {"metric": "val_macro_f1", "value": 1.0}}}]}
    with pytest.raises(Exception, match="task sentiment does not report val_macro_f1"):
        prepare(load_plan(write_plan(tmp_path, bad, "bad.yaml")), tmp_path / "bad.yaml", tmp_path / "cache")


def test_lm_examples_longer_than_the_context_are_a_plan_error(tmp_path: Path, corpus: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A classifier head on a 32-position LM used to fail with an IndexError inside the embedding."""
    labeled = tmp_path / "labeled.tsv"
    labeled.write_text("".join(f"{'pos' if i % 2 else 'neg'}\t{'a long text ' * 8}{'ab' * (i % 3)}\n" for i in range(20)),
                       encoding="utf-8")
    plan = tiny_plan(corpus, [STABLE, {"name": "cls", "task": "classify", "steps": 2,
                                       "optimizer": {"name": "adam", "lr": 1e-3},
                                       "data": {"train": str(labeled), "field": 1, "label": 0, "max_len": 40}}])
    path = write_plan(tmp_path, plan)
    assert _error(capsys, "check", str(path), "--cache", str(tmp_path / "cache")) == \
        (2, f"error: {path}: stages[1].data.max_len: examples are up to 40 tokens, more than the model's context "
            "length 32: set max_len <= 32\n")
