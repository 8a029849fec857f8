"""Class labels (or tags) <-> ids, fixed by the training data and saved with the run.

Ids are the ranks of the sorted labels, so the same training labels give the same ids whatever
order the file lists them in, and a label map is a sorted tuple: small, readable JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from stagewise.errors import UserError

_SHOWN = 10  # labels listed in an "unseen label" message before "and N more"


@dataclass(frozen=True)
class LabelMap:
    labels: tuple[str, ...]  # sorted, unique; id = index
    kind: str = "label"  # what the messages call one: "label", "tag"

    def __post_init__(self) -> None:
        assert self.labels, "a label map needs at least one label"
        assert list(self.labels) == sorted(set(self.labels)), "labels must be sorted and unique"

    @classmethod
    def from_labels(cls, labels: Iterable[str], kind: str = "label") -> LabelMap:
        """The map of every distinct label in `labels` (the training labels)."""
        return cls(tuple(sorted(set(labels))), kind)

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    @cached_property
    def _array(self) -> np.ndarray:
        return np.array(self.labels)

    def encode(self, label: str, where: str) -> int:
        """The id of `label`; an unseen label is a UserError at `where` (file:row)."""
        i = self._ids.get(label)
        if i is None:
            raise self._unseen(label, where)
        return i

    def encode_many(self, labels: Sequence[str], where: Callable[[int], str]) -> np.ndarray:
        """Ids (int64) of many labels at once; `where(i)` names the i-th for an unseen one.

        Vectorized: the labels are sorted, so a binary search over them (numpy compares strings
        by code point, as Python sorts them) finds every id without a Python loop per label."""
        if len(labels) == 0:
            return np.zeros(0, dtype=np.int64)
        query = np.asarray(labels, dtype=str)
        ids = np.searchsorted(self._array, query).clip(max=len(self.labels) - 1)
        unseen = np.flatnonzero(self._array[ids] != query)
        if unseen.size:
            first = int(unseen[0])
            raise self._unseen(str(labels[first]), where(first))
        return ids.astype(np.int64)

    def decode(self, i: int) -> str:
        return self.labels[i]

    def _unseen(self, label: str, where: str) -> UserError:
        shown = ", ".join(self.labels[:_SHOWN])
        if len(self.labels) > _SHOWN:
            shown += f" and {len(self.labels) - _SHOWN} more"
        return UserError(where, f"{self.kind} '{label}' is not one of the training {self.kind}s ({shown})")

    # --- saving with a run -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "labels": list(self.labels)}

    @classmethod
    def from_state_dict(cls, state: Any, where: str) -> LabelMap:
        """The map saved by `state_dict`; `where` names the file it came from, since a run
        directory can be edited by hand."""
        if not isinstance(state, dict) or not isinstance(state.get("labels"), list):
            raise UserError(where, "not a label map (expected an object with a 'labels' list)")
        labels, kind = state["labels"], state.get("kind", "label")
        if not labels or not all(isinstance(x, str) for x in labels) or not isinstance(kind, str):
            raise UserError(where, "'labels' must be a non-empty list of strings")
        if labels != sorted(set(labels)):
            raise UserError(where, "'labels' must be sorted and unique (ids are their ranks)")
        return cls(tuple(labels), kind)

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> LabelMap:
        try:
            state = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(where, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
        return cls.from_state_dict(state, where)
