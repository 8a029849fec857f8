"""Plan file -> validated `Plan`: safe YAML, command-line overrides, `defaults:` merged into each
stage, and pydantic's errors turned into one line naming the file and the key path.

A plan may come from anyone, so reading it is bounded before anything looks at it: the file's
size, the nesting depth, and the size of the document once every alias is expanded (a
billion-laughs file is a few hundred bytes that expand to 10**9 nodes), counted while it is
composed; errors echo at most ~80 characters of the input."""

from __future__ import annotations

import copy
import re
import reprlib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from stagewise.config.fields import suggest
from stagewise.config.plan_config import Plan
from stagewise.config.stage_config import MERGE_DEFAULTS, StageConfig
from stagewise.errors import UserError

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
        if _within(resolved, key) or _names(message, resolved):  # a check of the mapping, or of a
            return UserError(f"{COMMAND_LINE}: {key}{after}", message)  # pair of keys, the override changed
    return error


def _names(message: str, key: str) -> bool:
    """Whether the message names the key path (`model.n_head`, not `model.n_head_dim`)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.\[])", message) is not None


def _within(key: str, prefix: str) -> bool:
    return key == prefix or (key.startswith(prefix) and key[len(prefix)] in ".[")


MAX_PLAN_BYTES = 1_000_000
MAX_DEPTH = 32  # a plan's own keys nest about 7 deep (stages[i].rules[j].do.switch.betas)
MAX_NODES = 20_000  # scalars, lists and mappings, aliases expanded (and defaults merged into stages)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(str(path), "no such plan file")
    size = path.stat().st_size
    if size > MAX_PLAN_BYTES:
        raise UserError(str(path), f"{size:,} bytes: a plan file is at most {MAX_PLAN_BYTES:,}")
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(str(path), f"not UTF-8 (byte {e.start})") from None
    except (yaml.YAMLError, _Bounded) as e:
        raise UserError(str(path), _yaml_problem(e)) from None
    if not isinstance(raw, dict):
        raise UserError(str(path), "a plan is a mapping of keys (name, model, data, stages, ...)")
    return raw


def load_yaml(text: str) -> Any:
    """Safe YAML, refused past MAX_DEPTH levels or MAX_NODES nodes (aliases expanded); raises
    yaml.YAMLError (or its subclass for the bounds)."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError) as e:  # a scalar the constructor refuses, e.g. a date 2024-13-01
        raise yaml.YAMLError(f"a value cannot be read: {str(e)[:80]}") from None
    finally:
        loader.dispose()


class _Bounded(yaml.YAMLError):
    def __init__(self, mark: Any, problem: str) -> None:
        self.problem_mark, self.problem = mark, problem
        super().__init__(problem)


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


# libyaml's parser when present (4x faster on a long list); the composing is Python's, measured.
_Parser: Any = getattr(getattr(yaml, "cyaml", None), "CParser", None) or _PyParser


class _BoundedLoader(yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor,
                     yaml.resolver.Resolver):
    """A safe loader that measures each node as it is composed: its nesting depth on the way
    down, and its size and height with aliases expanded on the way up (an alias adds the measures
    of the node it names), so a bomb is refused before it is ever constructed."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._composed = 0
        self._open: set[str] = set()  # anchors whose node is being composed: an alias to one recurses
        self._measure: dict[int, tuple[int, int]] = {}  # id(node) -> (size, height), aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open:
                raise _Bounded(event.start_mark, f"the alias *{event.anchor} is inside its own anchor")
            return super().compose_node(parent, index)
        event = self.peek_event()
        self._depth += 1
        self._composed += 1
        if self._composed > MAX_NODES:
            raise _Bounded(event.start_mark, f"more than {MAX_NODES:,} values")
        if self._depth > MAX_DEPTH:
            raise _Bounded(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        if event.anchor is not None:
            self._open.add(event.anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(event.anchor)
        children = node.value if node is not None and isinstance(node.value, list) else []
        kids = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        measures = [self._measure[id(k)] for k in kids]
        size = 1 + sum(m[0] for m in measures)
        height = 1 + max((m[1] for m in measures), default=0)
        if size > MAX_NODES:
            raise _Bounded(event.start_mark, f"more than {MAX_NODES:,} values once its aliases are expanded")
        if height > MAX_DEPTH:
            raise _Bounded(event.start_mark, f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded")
        self._measure[id(node)] = (size, height)
        return node


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    line = f"line {mark.line + 1}: " if mark is not None else ""
    if isinstance(e, _Bounded):
        return f"{line}{e.problem}"
    return f"{line}invalid YAML: {str(getattr(e, 'problem', None) or e)[:120]}"


def count_values(obj: Any, budget: int) -> int:
    """The scalars, lists and mappings in `obj`, counted up to `budget` (then budget + 1)."""
    count, stack = 0, [obj]
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def validate_plan(raw: dict[str, Any], where: str) -> Plan:
    if count_values(raw, MAX_NODES) > MAX_NODES:
        raise UserError(where, f"more than {MAX_NODES:,} values")
    raw = copy.deepcopy(raw)
    defaults = raw.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise UserError(where, "defaults: must be a mapping of stage keys")
    _check_defaults(defaults, where)
    stages = raw.get("stages")
    if isinstance(stages, list):
        merged = count_values(defaults, MAX_NODES) * len(stages)
        if merged > MAX_NODES:  # defaults are copied into every stage
            raise UserError(where, f"defaults: merged into {len(stages):,} stages, more than {MAX_NODES:,} values")
        raw["stages"] = [deep_merge(_defaults_for(defaults, s), s) if isinstance(s, dict) else s for s in stages]
    try:
        return Plan.model_validate(raw)
    except ValidationError as e:
        raise UserError(where, describe_error(e, Plan, raw)) from None


def _defaults_for(defaults: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """A merge stage trains nothing: of the defaults it takes only what its evaluation reads."""
    return {k: v for k, v in defaults.items() if k in MERGE_DEFAULTS} if "merge" in stage else defaults


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
    where = f"{COMMAND_LINE}: {_cut(item)}"
    if not sep or not key:
        raise UserError(where, "expected key.path=value")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(where, f"value is not valid YAML ({_yaml_problem(e)})") from None
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
    hint = suggest(part, [n for n in names if isinstance(n, str)])
    raise UserError(where, f"no stage '{part}'{hint}")


def describe_error(e: ValidationError, model: type[BaseModel], raw: dict[str, Any]) -> str:
    errors = e.errors()
    # A union (a column name or index) fails once per member at one key: the member of the
    # value's own type says what is wrong with it, not that -1 is no string.
    path = format_path(list(errors[0]["loc"]), raw)
    same = [err for err in errors if format_path(list(err["loc"]), raw) == path]
    first = next((err for err in same if not err["type"].endswith(("_type", "_parsing"))), same[0])
    text = _describe_one(first, model, raw)
    others = len(errors) - len(same)
    return text + (f" (and {others} more)" if others else "")


def _describe_one(err: Any, model: type[BaseModel], raw: dict[str, Any] | None = None) -> str:
    loc = list(err["loc"])
    ctx = err.get("ctx") or {}
    if err["type"] == "setting_error":
        key = ctx["key"]
        loc.extend(key if isinstance(key, list) else [key])
        msg = err["msg"]
    elif err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        msg = "unknown key" + suggest(str(loc[-1]), fields)
    elif err["type"] == "missing":
        msg = "required"
    else:
        msg = f"{err['msg'][0].lower()}{err['msg'][1:]} (got {echo(err['input'])})"
    return f"{format_path(loc, raw)}: {msg}"


_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxstring, _ECHO.maxlong, _ECHO.maxother = 2, 60, 40, 60
_ECHO.maxdict = _ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxset = 4


def echo(value: Any, limit: int = 80) -> str:
    """A short repr of bad input: never the whole of a huge (or alias-shared) structure."""
    return _cut(_ECHO.repr(value), limit)


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_path(loc: list[Any], raw: dict[str, Any] | None = None) -> str:
    """('stages', 1, 'schedule', 'warmup') -> stages[1].schedule.warmup; pydantic's union-member
    tags (e.g. 'function-after[...]', 'int', 'float') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not isinstance(part, str):
            out += f".{_cut(repr(part), 40)}" if out else _cut(repr(part), 40)
        elif "[" in part or part in {"int", "float", "str", "bool", "list", "tuple", "constrained-int",
                                       "constrained-float", "constrained-str", "literal", "none"}:
            continue
        else:
            out += f".{_cut(part, 40)}" if out else _cut(part, 40)
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
