"""The models the fine-tuning tasks build from the plan's `model` (causal LMs: models.build): the
ones stagewise builds itself (bigru, transformer, plug-ins: config.registry.ARCHS) by their
registered builds, transformers ones (bert, t5, bart, ...)
from config, with what the data sets (vocabulary, labels, special tokens) filled in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from torch import nn

from stagewise.config.fields import suggest
from stagewise.config.plan_config import ModelConfig
from stagewise.config.registry import ARCHS, TASKS, ArchModel, arch_model
from stagewise.errors import UserError
from stagewise.tasks.spec import TaskSpec, task_spec


def root_model(cfg: ModelConfig, task: TaskSpec, sizes: dict[str, int],
               transformers_model: Callable[[str, dict[str, Any]], nn.Module]) -> nn.Module:
    """The plan's model for a first stage of `task`: one stagewise builds (config.registry.ARCHS)
    given its data `sizes`, else `transformers_model(arch, size keys)`."""
    arch = cfg.arch
    if cfg.pretrained is not None or arch is None:
        raise UserError("model.pretrained", f"a first {task.name} stage builds its model from arch (pretrained "
                                            "loads causal LMs)")
    if not task.is_builtin(cfg):
        families = ARCHS[arch].models if arch in ARCHS else {}
        others = [t.name for t in TASKS.values() if t.traits.model_kind in families]
        if others:
            raise UserError("model.arch", f"'{arch}' is a model for {' and '.join(others)}, not {task.name}")
        return transformers_model(arch, cfg.size_keys())
    return build_builtin(cfg, task, sizes)


def build_builtin(cfg: ModelConfig, task: TaskSpec, sizes: dict[str, int]) -> nn.Module:
    """The model `cfg.arch` stagewise builds for `task`, from the plan's settings (checked by
    plan.model_keys) and the data's `sizes`."""
    model = arch_model(cfg.arch, task.traits.model_kind)
    assert cfg.arch is not None and model is not None
    check_settings(cfg.arch, model, cfg.size_keys())
    try:
        return model.build(**sizes, **cfg.size_keys())
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError("model", f"{cfg.arch} refused its settings: {e}") from None


def unknown_settings(arch: str, model: ArchModel, keys: dict[str, Any]) -> None:
    """UserError naming the first of the plan's `model` keys that is no setting of `arch`."""
    allowed = sorted(model.settings.model_fields)
    for key in sorted(keys):
        if key not in allowed:
            raise UserError(f"model.{key}", f"not a setting of {arch} (it takes: {', '.join(allowed)})"
                                            f"{suggest(key, allowed)}")


def check_settings(arch: str, model: ArchModel, keys: dict[str, Any]) -> None:
    """The plan's `model` keys against the architecture's settings model: a key it does not take,
    or a value it refuses, is one line naming the key."""
    unknown_settings(arch, model, keys)
    try:
        model.settings.model_validate(keys)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise UserError(f"model.{key}" if key else "model", f"{first['msg'][0].lower()}{first['msg'][1:]} "
                                        f"(got {repr(first.get('input'))[:60]})") from None


def builtin_model(arch: str, task: str, sizes: dict[str, int], settings: dict[str, Any]) -> nn.Module:
    """A model stagewise builds, rebuilt from an export's model.json."""
    model = arch_model(arch, task_spec(task).traits.model_kind)
    if model is None:
        raise UserError("model.json", f"arch '{arch}' is not registered for task {task} (a plug-in's: "
                                      "load it with --plugin)")
    return model.build(**sizes, **settings)


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
