"""A plan as a Python object: from a YAML file, a dict or pydantic objects, with command-line
style overrides (`stages.cooldown.steps=800`), validated once, and back to YAML."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from stagewise.config.plan_config import Plan as PlanConfig
from stagewise.errors import UserError
from stagewise.plan.load import apply_override, blame_overrides, read_yaml, validate_plan


class Plan:
    """A validated plan. `raw`: the mapping it was read from (overrides applied), what `to_yaml`
    writes; `config`: the validated, typed plan (stagewise.config.plan_config.Plan); `path`: its file
    (None: built in Python); relative data paths are read from `base_dir` (the file's directory,
    else the working directory). Bad input raises UserError with the same one line as the CLI."""

    def __init__(self, raw: Mapping[str, Any], *, path: Path | None = None, base_dir: Path | None = None,
                 overrides: Sequence[str] = (), _text: str | None = None) -> None:
        self.raw: dict[str, Any] = copy.deepcopy(dict(raw))
        self.path = Path(path) if path is not None else None
        self.base_dir = Path(base_dir) if base_dir is not None else (self.path.parent if self.path else Path.cwd())
        self.overrides = tuple(overrides)
        # resolved key path -> the override's key as typed, for errors that name the command line
        self.typed = {apply_override(self.raw, item): item.partition("=")[0] for item in self.overrides}
        self._text = _text if not self.overrides else None
        try:
            self.config: PlanConfig = validate_plan(self.raw, where=self.where)
        except UserError as e:
            raise blame_overrides(e, self.where, self.typed) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> Plan:
        path = Path(path)
        raw = read_yaml(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        return cls(raw, path=path, overrides=overrides, _text=text)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: str | Path | None = None,
                  overrides: Sequence[str] = ()) -> Plan:
        if not isinstance(raw, Mapping):
            raise UserError("plan", f"a mapping of plan keys, not {type(raw).__name__}")
        return cls(raw, base_dir=Path(base_dir) if base_dir is not None else None, overrides=overrides)

    @classmethod
    def from_config(cls, config: PlanConfig, *, base_dir: str | Path | None = None) -> Plan:
        """From the typed plan's pydantic objects (stagewise.config)."""
        return cls.from_dict(config.model_dump(mode="json", by_alias=True, exclude_none=True), base_dir=base_dir)

    def with_overrides(self, *overrides: str) -> Plan:
        """A new plan with more `key.path=value` overrides applied."""
        return Plan(self.raw, path=self.path, base_dir=self.base_dir, overrides=overrides)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def where(self) -> str:
        """What errors name: the file, or `plan` for one built in Python."""
        return str(self.path) if self.path is not None else "plan"

    @property
    def file(self) -> Path:
        """The path the engine names the plan by; data paths are relative to its directory."""
        return self.path if self.path is not None else self.base_dir / "plan"

    def to_yaml(self) -> str:
        """The plan as YAML: a file's own text when nothing was overridden, else the mapping dumped."""
        return self._text if self._text is not None else yaml.safe_dump(self.raw, sort_keys=False)

    def __repr__(self) -> str:
        return f"Plan({self.name!r}, {len(self.config.stages)} stages, from {self.where})"
