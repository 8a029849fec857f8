"""The built-in tasks, added to the task registry (config.registry) under their plan names. A new
task is one module with a `TaskSpec` (tasks.spec) added the same way."""

from __future__ import annotations

from stagewise.config.registry import TASKS
from stagewise.tasks.classify import ClassifySpec
from stagewise.tasks.lm import CausalLMSpec
from stagewise.tasks.seq2seq import Seq2SeqSpec
from stagewise.tasks.sft import SftSpec
from stagewise.tasks.tag import TagSpec
from stagewise.tasks.user_task import UserTaskSpec

for _spec in (CausalLMSpec(), SftSpec(), ClassifySpec(), Seq2SeqSpec(), TagSpec(), UserTaskSpec()):
    TASKS[_spec.name] = _spec
