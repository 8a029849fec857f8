"""Every task stagewise trains, by its plan name. A new task is one module under `tasks/` with a
`TaskSpec` (tasks.spec) and one line here."""

from __future__ import annotations

from stagewise.errors import UserError
from stagewise.tasks.classify import ClassifySpec
from stagewise.tasks.lm import CausalLMSpec
from stagewise.tasks.seq2seq import Seq2SeqSpec
from stagewise.tasks.sft import SftSpec
from stagewise.tasks.spec import TaskSpec
from stagewise.tasks.tag import TagSpec
from stagewise.tasks.user_task import UserTaskSpec

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (CausalLMSpec(), SftSpec(), ClassifySpec(), Seq2SeqSpec(),
                                                           TagSpec(), UserTaskSpec())}


def task_spec(name: str, where: str = "task") -> TaskSpec:
    if name not in TASKS:
        raise UserError(where, f"unknown task '{name}' (tasks: {', '.join(TASKS)})")
    return TASKS[name]
