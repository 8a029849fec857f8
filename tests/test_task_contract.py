"""The task contract: a required core every task has (tasks.spec.TaskCore: prepare, root_model,
bind), its flags in one frozen TaskTraits, and the optional capabilities (export, generate,
evaluate a file) as protocols the commands check for."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from test_python_api import EXAMPLE, QUIET, SHORT

import stagewise
from stagewise.config.registry import TASKS
from stagewise.errors import UserError
from stagewise.tasks.spec import TaskCore, TaskSpec, register_task
from stagewise.tasks.traits import EvaluatesFiles, Exports, Generates, TaskTraits


def test_every_task_has_the_core_and_declares_what_else_it_can_do() -> None:
    for name, spec in TASKS.items():
        assert isinstance(spec, TaskCore) and isinstance(spec.traits, TaskTraits), name
    builtin = {"causal_lm", "sft", "classify", "seq2seq", "tag", "python"}
    assert {n for n, s in TASKS.items() if isinstance(s, Exports)} >= builtin
    assert {n for n, s in TASKS.items() if isinstance(s, Generates)} & builtin == builtin - {"python"}
    assert {n for n, s in TASKS.items() if isinstance(s, EvaluatesFiles)} & builtin == builtin - {"python"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["classify"].traits.samples = True  # type: ignore[misc]


def test_a_spec_without_traits_is_refused_when_registered() -> None:
    class NoTraits(TaskSpec[Any]):
        name = "no-traits"

        def prepare(self, inp: Any) -> tuple[Any, str]:
            return None, ""

        def bind(self, *args: Any) -> Any:
            return None

    with pytest.raises(TypeError, match="task NoTraits needs a name, TaskTraits and prepare, root_model, bind"):
        register_task(NoTraits)
    assert "no-traits" not in TASKS


def test_a_task_without_generate_or_evaluate_says_so_in_one_line(tmp_path: Path) -> None:
    plan = {**SHORT, "stages": [{**SHORT["stages"][0], "steps": 2}]}
    run = stagewise.train(plan, out=tmp_path / "run", cache=tmp_path / "cache", console=QUIET,
                          model=EXAMPLE.make_model(), data={"train": EXAMPLE.make_rows()}, loss=EXAMPLE.next_token_loss)
    stage = next(iter(run.stages))
    assert run.stages[stage].export is not None  # task python exports (Exports), it does not generate
    with pytest.raises(UserError) as generated:
        run.generate("to be")
    assert str(generated.value) == f"generate: task python generates nothing (stage '{stage}'): use its model"
    (tmp_path / "rows.txt").write_text("to be or not to be\n", encoding="utf-8")
    with pytest.raises(UserError) as evaluated:
        run.evaluate(tmp_path / "rows.txt")
    assert str(evaluated.value) == f"evaluate: task python evaluates no files (stage '{stage}'): use its model"
