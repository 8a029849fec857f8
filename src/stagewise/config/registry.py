"""What a plan may name: the registries of tasks (and, through the same class, of the other kinds
of entries). The plan's schema checks names against them; the modules that define the entries
fill them.

A registry loads its built-in entries on first use, by the module name it is given: the schema
(this leaf package) names what it checks without importing the packages above it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(MutableMapping[str, T], Generic[T]):
    """Entries by name, in the order they were added. `builtins`: the module whose import adds
    the built-in ones; it is imported the first time an entry is looked up."""

    def __init__(self, kind: str, builtins: str) -> None:
        self.kind = kind
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = False

    def _all(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.builtins)
        return self._entries

    def __getitem__(self, name: str) -> T:
        return self._all()[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()


TASKS: Registry[Any] = Registry("task", builtins="stagewise.tasks.builtin_tasks")
