"""A search space: plan key paths, in the override syntax of `stagewise train PLAN key=value`
(plan.load.apply_override: `stages.cooldown.schedule.shape`), each mapped to a distribution:

    stages.cooldown.optimizer.lr: {float: [1.0e-4, 3.0e-3], log: true}
    stages.stable.batch.size: {int: [8, 32]}
    stages.cooldown.schedule.shape: {choice: [linear, cosine, 1-sqrt]}

Every key is checked against the plan before any trial runs: each end of a range and each choice
is put into the plan, which must still validate."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stagewise.errors import UserError
from stagewise.plan.load import apply_override, validate_plan

_KINDS = ("float", "int", "choice")
_FORMS = "{float: [lo, hi], log: true}, {int: [lo, hi]} or {choice: [a, b, ...]}"


@dataclass(frozen=True)
class Param:
    key: str  # the plan key path
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial samples for this key (its parameter is named by the key)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

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
    return [_param(str(path), str(key), spec) for key, spec in raw.items()]


def _param(where: str, key: str, spec: Any) -> Param:
    at = f"{where}: {key}"
    kinds = [k for k in _KINDS if isinstance(spec, dict) and k in spec]
    if not isinstance(spec, dict) or len(kinds) != 1:
        raise UserError(at, f"a distribution is one of {_FORMS}")
    kind = kinds[0]
    extra = set(spec) - {kind, "log"}
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
        return Param(key, kind, choices=tuple(value))
    number = int if kind == "int" else (int, float)
    if (not isinstance(value, list) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, number) for v in value)):
        raise UserError(f"{at}.{kind}", f"[lo, hi]: two {'integers' if kind == 'int' else 'numbers'} (got {value!r})")
    low, high = value
    if low >= high:
        raise UserError(f"{at}.{kind}", f"empty range [{low}, {high}]: need lo < hi")
    if log and low <= 0:
        raise UserError(f"{at}.{kind}", f"a log range needs lo > 0 (got {low})")
    return Param(key, kind, float(low), float(high), log)


def override(key: str, value: Any) -> str:
    """`key=value` as `stagewise train PLAN key=value` reads it back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n...\n").strip()
    return f"{key}={text}"


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    apply_override(raw, override(key, value))


def with_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw plan with the sampled values put in: a trial's plan."""
    out = copy.deepcopy(raw)
    for key, value in params.items():
        set_key(out, key, value)
    return out


def check_space(space: list[Param], raw: dict[str, Any], plan_path: Path, space_path: Path) -> None:
    """Each key, at each of its extreme values on its own, leaves a valid plan; else one line
    naming the key."""
    for param in space:
        for value in param.extremes():
            trial = copy.deepcopy(raw)
            at = f"{space_path}: {param.key}"
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
