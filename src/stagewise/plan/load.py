"""Plan file -> validated `Plan`: safe YAML, command-line overrides, `defaults:` merged into each
stage, and pydantic's errors turned into one line naming the file and the key path."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from stagewise.errors import UserError
from stagewise.plan.schema import Plan, StageConfig

COMMAND_LINE = "command line"


def load_plan(path: Path, overrides: list[str] | None = None) -> Plan:
    raw = read_yaml(path)
    typed = _apply_overrides(raw, overrides or [])
    try:
        return validate_plan(raw, where=str(path))
    except UserError as e:
        raise blame_overrides(e, str(path), typed) from None


def override_keys(path: Path, overrides: list[str]) -> dict[str, str]:
    """What `blame_overrides` needs of a plan loaded with `overrides` (for errors found later, in
    the data or the model the plan names)."""
    return _apply_overrides(read_yaml(path), overrides)


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    return {apply_override(raw, item): item.partition("=")[0] for item in overrides}


def blame_overrides(error: UserError, plan_where: str, typed: dict[str, str]) -> UserError:
    """The error, naming the command line instead of the plan file when its key path is one an
    override set (or lies inside or above one); the key as the user typed it. `typed`: resolved
    key path (`stages[0].steps`) -> the override's key (`stages.stable.steps`)."""
    if error.where == plan_where:  # a validation error: the key path leads the message
        key, _, message = error.message.partition(": ")
        rest = ""
    elif error.where.startswith(f"{plan_where}: "):  # found later: the key path (and a file) lead `where`
        key, _, rest = error.where.removeprefix(f"{plan_where}: ").partition(": ")
        message = error.message
    else:
        return error
    after = f": {rest}" if rest else ""
    for resolved, key_typed in typed.items():
        if _within(key, resolved):
            return UserError(f"{COMMAND_LINE}: {key_typed}{key[len(resolved):]}{after}", message)
        if _within(resolved, key):  # a check of the mapping the override changed a key of
            return UserError(f"{COMMAND_LINE}: {key}{after}", message)
    return error


def _within(key: str, prefix: str) -> bool:
    return key == prefix or (key.startswith(prefix) and key[len(prefix)] in ".[")


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(str(path), "no such plan file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(str(path), f"not UTF-8 (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(str(path), f"{line}invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise UserError(str(path), "a plan is a mapping of keys (name, model, data, stages, ...)")
    return raw


def validate_plan(raw: dict[str, Any], where: str) -> Plan:
    raw = copy.deepcopy(raw)
    defaults = raw.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise UserError(where, "defaults: must be a mapping of stage keys")
    _check_defaults(defaults, where)
    stages = raw.get("stages")
    if isinstance(stages, list):
        raw["stages"] = [deep_merge(defaults, s) if isinstance(s, dict) else s for s in stages]
    try:
        return Plan.model_validate(raw)
    except ValidationError as e:
        raise UserError(where, describe_error(e, Plan, raw)) from None


def _check_defaults(defaults: dict[str, Any], where: str) -> None:
    """`defaults:` is a partial stage: its keys must be stage keys, its values valid for them."""
    if "name" in defaults:
        raise UserError(where, "defaults.name: a stage name cannot be a default")
    try:
        StageConfig.model_validate({"name": "defaults", "steps": 1, "batch": {"size": 1}, **defaults})
    except ValidationError as e:
        # Missing keys are fine in defaults; the merged stages are checked for them.
        problems = [err for err in e.errors() if err["type"] != "missing"]
        if problems:
            raise UserError(where, "defaults." + _describe_one(problems[0], StageConfig)) from None


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict[str, Any], item: str) -> str:
    """`key.path=value`; a stage is addressed by name or index: `stages.cooldown.steps=800`.
    The value is parsed as a YAML scalar/flow value (`0.1`, `true`, `[0.9, 0.95]`). Returns the
    key path it set, as error messages write it (`stages[1].steps`)."""
    key, sep, text = item.partition("=")
    where = f"{COMMAND_LINE}: {item}"
    if not sep or not key:
        raise UserError(where, "expected key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(where, "value is not valid YAML") from None
    parts = key.split(".")
    node: Any = raw
    resolved: list[str | int] = []
    for i, part in enumerate(parts[:-1]):
        node, step = _child(node, part, parts[: i + 1], where)
        resolved.append(step)
    last = parts[-1]
    if isinstance(node, list):
        index = _stage_index(node, last, where)
        node[index] = value
        resolved.append(index)
    elif isinstance(node, dict):
        node[last] = value
        resolved.append(last)
    else:
        raise UserError(where, f"{'.'.join(parts[:-1])} is not a mapping")
    return format_path(resolved)


def _child(node: Any, part: str, path: list[str], where: str) -> tuple[Any, str | int]:
    if isinstance(node, list):
        index = _stage_index(node, part, where)
        return node[index], index
    if not isinstance(node, dict):
        raise UserError(where, f"{'.'.join(path[:-1])} is not a mapping")
    return node.setdefault(part, {}), part


def _stage_index(stages: list[Any], part: str, where: str) -> int:
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    if part in names:
        return names.index(part)
    if part.isdigit() and int(part) < len(stages):
        return int(part)
    hint = _suggest(part, [n for n in names if isinstance(n, str)])
    raise UserError(where, f"no stage '{part}'{hint}")


def describe_error(e: ValidationError, model: type[BaseModel], raw: dict[str, Any]) -> str:
    errors = e.errors()
    text = _describe_one(errors[0], model, raw)
    return text + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def _describe_one(err: Any, model: type[BaseModel], raw: dict[str, Any] | None = None) -> str:
    loc = list(err["loc"])
    ctx = err.get("ctx") or {}
    if err["type"] == "setting_error":
        key = ctx["key"]
        loc.extend(key if isinstance(key, list) else [key])
        msg = err["msg"]
    elif err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        msg = "unknown key" + _suggest(str(loc[-1]), fields)
    elif err["type"] == "missing":
        msg = "required"
    else:
        msg = f"{err['msg'][0].lower()}{err['msg'][1:]} (got {err['input']!r})"
    return f"{format_path(loc, raw)}: {msg}"


def format_path(loc: list[Any], raw: dict[str, Any] | None = None) -> str:
    """('stages', 1, 'schedule', 'warmup') -> stages[1].schedule.warmup; pydantic's union-member
    tags (e.g. 'function-after[...]', 'int', 'float') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in {"int", "float", "str", "bool", "list", "tuple", "constrained-int",
                                       "constrained-float", "literal", "none"}:
            continue
        else:
            out += f".{part}" if out else part
    return out


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The field names of the model found at `loc`, for close-match suggestions."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            continue
        current = _model_in(field.annotation)
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _suggest(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
