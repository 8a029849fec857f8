"""The models the fine-tuning tasks build from the plan's `model` (causal LMs: models.build): the
built-in ones (bigru, transformer) by their constructors, transformers ones (bert, t5, bart, ...)
from config, with what the data sets (vocabulary, labels, special tokens) filled in."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from stagewise.config.plan_config import ModelConfig
from stagewise.config.registry import TASKS
from stagewise.errors import UserError
from stagewise.tasks.spec import TaskSpec, task_spec

# Constructor arguments the data sets, which the plan may not.
_SET_BY_DATA = {"num_classes", "num_tags", "vocab_size", "src_vocab_size", "tgt_vocab_size", "pad_id"}


def root_model(cfg: ModelConfig, task: TaskSpec, sizes: dict[str, int],
               transformers_model: Callable[[str, dict[str, Any]], nn.Module]) -> nn.Module:
    """The plan's model for a first stage of `task`: one of the task's built-in models given its
    data `sizes`, else `transformers_model(arch, size keys)`."""
    arch = cfg.arch
    if cfg.pretrained is not None or arch is None:
        raise UserError("model.pretrained", f"a first {task.name} stage builds its model from arch (pretrained "
                                            "loads causal LMs)")
    if arch not in task.builtin:
        others = [t.name for t in TASKS.values() if arch in t.builtin]
        if others:
            raise UserError("model.arch", f"'{arch}' is a model for {' and '.join(others)}, not {task.name}")
        return transformers_model(arch, cfg.size_keys())
    return build_builtin(cfg, task, sizes)


def build_builtin(cfg: ModelConfig, task: TaskSpec, sizes: dict[str, int]) -> nn.Module:
    """The task's own model `cfg.arch`, from the plan's settings and the data's `sizes`."""
    arch = cfg.arch
    assert arch is not None and arch in task.builtin
    cls = task.builtin[arch]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - _SET_BY_DATA
    for key in sorted(cfg.size_keys()):
        if key not in allowed:
            raise UserError(f"model.{key}", f"not a setting of {arch} (it takes: {', '.join(sorted(allowed))})")
    try:
        return cls(**sizes, **cfg.size_keys())
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError("model", f"{arch} refused its settings: {e}") from None


def builtin_model(arch: str, task: str, sizes: dict[str, int], settings: dict[str, Any]) -> nn.Module:
    """A built-in model rebuilt from an export's model.json."""
    return task_spec(task).builtin[arch](**sizes, **settings)


def from_config(auto: Any, arch: str, keys: dict[str, Any], **set_by_data: Any) -> nn.Module:
    """A transformers model of `arch` built from config: the plan's size keys, plus what the
    data sets, which the plan may not override."""
    from transformers import AutoConfig

    for key in sorted(keys):
        if key in set_by_data:
            raise UserError(f"model.{key}", "set by the stage's data, not by the plan")
    try:
        config = AutoConfig.for_model(arch, **set_by_data, **keys)
    except (TypeError, ValueError) as e:
        raise UserError("model", f"{arch} config refused: {e}") from None
    return auto.from_config(config)


def check_arch(arch: str, names: Any, what: str) -> None:
    """`arch` must be a transformers model type in `names` (an Auto class's mapping)."""
    if arch not in names:
        raise UserError("model.arch", f"'{arch}' is neither a built-in model nor a transformers architecture "
                                      f"with {what}")
