"""A search space: plan key paths, in the override syntax of `stagewise train PLAN key=value`
(plan.load.apply_override: `stages.cooldown.schedule.shape`), each mapped to a distribution:

    stages.cooldown.optimizer.lr: {float: [1.0e-4, 3.0e-3], log: true}
    stages.stable.batch.size: {int: [8, 32]}
    stages.cooldown.schedule.shape: {choice: [linear, cosine, 1-sqrt]}

A choice may give other keys their own distributions per value (`when`; Optuna's define-by-run
space: a key is sampled only in the trials that made its choice), e.g. an LR range per optimizer:

    stages.tune.optimizer.name:
      choice: [adamw, sgd]
      when:
        adamw: {stages.tune.optimizer.lr: {float: [1.0e-4, 3.0e-3], log: true}}
        sgd: {stages.tune.optimizer.lr: {float: [0.01, 1.0], log: true}}

Such a key's Optuna parameter is named `KEY|VALUE` (`stages.tune.optimizer.lr|sgd`), so each
range has its own history. Every key is checked against the plan before any trial runs: each end
of a range and each choice is put into the plan (a `when` key's with its choice made), which must
still validate."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stagewise.errors import UserError
from stagewise.plan.load import apply_override, validate_plan

_KINDS = ("float", "int", "choice")
EDGE = 0.05  # a best value this close to an end of its range (a share of the range) may lie beyond it
_FORMS = "{float: [lo, hi], log: true}, {int: [lo, hi]} or {choice: [a, b, ...]}"


@dataclass(frozen=True)
class Param:
    key: str  # the plan key path
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()
    name: str = ""  # the Optuna parameter (always set by load_space): the key, or KEY|VALUE for a key of a choice's `when`
    when: tuple[tuple[Any, tuple[Param, ...]], ...] = ()  # choice value -> the keys sampled with it

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial samples for this key."""
        name = self.name
        if self.kind == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(name, list(self.choices))

    def edge(self, value: float) -> str | None:
        """`low` or `high` when `value` lies in the outer EDGE of the range (on a log scale for a log
        range), else None."""
        if self.kind == "choice":
            return None
        scale = math.log if self.log else float
        share = (scale(value) - scale(self.low)) / (scale(self.high) - scale(self.low))
        return "low" if share <= EDGE else "high" if share >= 1 - EDGE else None

    def extremes(self) -> list[Any]:
        """The values that check the key against the plan: both ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


def load_space(path: Path) -> list[Param]:
    if not path.is_file():
        raise UserError(str(path), "no such search space file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(str(path), f"not a YAML file ({type(e).__name__})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(str(path), f"a search space maps plan key paths to distributions: {_FORMS}")
    space = [_param(str(path), str(key), spec) for key, spec in raw.items()]
    names: dict[str, str] = {}
    for param in every_param(space):
        if param.name in names or (param.name != param.key and param.key in raw):
            raise UserError(f"{path}: {names.get(param.name, param.key)}",
                            "sampled twice in one trial (a key either has one distribution, or one per value "
                            "of a single choice)")
        names[param.name] = param.key
    return space


def _param(where: str, key: str, spec: Any, path: str = "", choice: Any = None) -> Param:
    """`path`: where the spec is in the file (the key, or `CHOICE.when.VALUE.KEY`); `choice`: the
    value of the choice whose `when` holds it."""
    path = path or key
    at = f"{where}: {path}"
    kinds = [k for k in _KINDS if isinstance(spec, dict) and k in spec]
    if not isinstance(spec, dict) or len(kinds) != 1:
        raise UserError(at, f"a distribution is one of {_FORMS}")
    kind = kinds[0]
    name = key if choice is None else f"{key}|{choice}"
    extra = set(spec) - {kind, "log", "when"}
    if "when" in spec and kind != "choice":
        raise UserError(f"{at}.when", "only a choice has `when` (a distribution per value of the choice)")
    if extra or (kind == "choice" and "log" in spec):
        raise UserError(at, f"unknown key '{sorted(extra or {'log'})[0]}' (a distribution is one of {_FORMS})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{at}.log", f"true or false (got {log!r})")
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise UserError(f"{at}.choice", "a non-empty list of values")
        if any(v is not None and not isinstance(v, (bool, int, float, str)) for v in value):
            raise UserError(f"{at}.choice", "each choice is a single value (number, string, true/false or null)")
        if len({yaml.safe_dump(v) for v in value}) < len(value):
            raise UserError(f"{at}.choice", "the same value twice")
        return Param(key, kind, choices=tuple(value), name=name, when=_when(where, path, spec.get("when"), value))
    number = int if kind == "int" else (int, float)
    if (not isinstance(value, list) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, number) for v in value)):
        raise UserError(f"{at}.{kind}", f"[lo, hi]: two {'integers' if kind == 'int' else 'numbers'} (got {value!r})")
    low, high = value
    if low >= high:
        raise UserError(f"{at}.{kind}", f"empty range [{low}, {high}]: need lo < hi")
    if log and low <= 0:
        raise UserError(f"{at}.{kind}", f"a log range needs lo > 0 (got {low})")
    return Param(key, kind, float(low), float(high), log, name=name)


def _when(where: str, path: str, when: Any, choices: list[Any]) -> tuple[tuple[Any, tuple[Param, ...]], ...]:
    """A choice's `when`: each of its values -> the keys sampled (and their distributions) when
    the choice takes that value."""
    if when is None:
        return ()
    at = f"{where}: {path}.when"
    if not isinstance(when, dict) or not when:
        raise UserError(at, "maps values of the choice to {key: distribution, ...}")
    out = []
    for value, keys in when.items():
        if yaml.safe_dump(value) not in {yaml.safe_dump(c) for c in choices}:
            raise UserError(f"{at}.{value}", f"not one of the choices {choices}")
        if not isinstance(keys, dict) or not keys:
            raise UserError(f"{at}.{value}", f"maps plan key paths to distributions: {_FORMS}")
        out.append((value, tuple(_param(where, str(k), spec, f"{path}.when.{value}.{k}", value)
                                 for k, spec in keys.items())))
    return tuple(out)


def every_param(space: list[Param] | tuple[Param, ...]) -> list[Param]:
    """The space's parameters, those of each choice's `when` included."""
    return [q for p in space for q in [p, *every_param([r for _, keys in p.when for r in keys])]]


def sample(space: list[Param] | tuple[Param, ...], trial: Any) -> dict[str, Any]:
    """A trial's values by parameter name: each key, then the keys its choice's value brings."""
    values: dict[str, Any] = {}
    for param in space:
        value = values[param.name] = param.suggest(trial)
        for choice, keys in param.when:
            if yaml.safe_dump(choice) == yaml.safe_dump(value):
                values.update(sample(keys, trial))
    return values


def key_of(name: str) -> str:
    """The plan key of an Optuna parameter name (KEY, or KEY|VALUE)."""
    return name.partition("|")[0]


def override(key: str, value: Any) -> str:
    """`key=value` as `stagewise train PLAN key=value` reads it back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n...\n").strip()
    return f"{key}={text}"


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    apply_override(raw, override(key, value))


def with_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw plan with the sampled values put in: a trial's plan."""
    out = copy.deepcopy(raw)
    for name, value in params.items():
        set_key(out, key_of(name), value)
    return out


def check_space(space: list[Param] | tuple[Param, ...], raw: dict[str, Any], plan_path: Path, space_path: Path) -> None:
    """Each key, at each of its extreme values on its own (a `when` key's with its choice made),
    leaves a valid plan; else one line naming the key."""
    for param in space:
        for value in param.extremes():
            trial = copy.deepcopy(raw)
            at = f"{space_path}: {param.name}"
            try:
                set_key(trial, param.key, value)
            except UserError as e:
                raise UserError(at, f"not a key of {plan_path}: {e.message}") from None
            try:
                validate_plan(trial, where=str(plan_path))
            except UserError as e:
                if "unknown key" in e.message:
                    raise UserError(at, f"not a key of {plan_path}: {e.message}") from None
                raise UserError(at, f"{value!r} makes {plan_path} invalid: {e.message}") from None
            for choice, keys in param.when:
                if yaml.safe_dump(choice) == yaml.safe_dump(value):
                    check_space(keys, trial, plan_path, space_path)
