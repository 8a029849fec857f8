"""The plan's stages as a tree: `from:` is read here and nowhere else.

A stage's parent is the previous stage unless it says `from: NAME` (that stage's end) or
`from: NAME@STEP` (its checkpoint at that step); `from: init` (and the first stage) starts from the
model as built, a root. Every later step of preparation (data and models, resolution, hand-off
checks, shortening for verify-resume, reports) walks these nodes instead of parsing names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from stagewise.config.plan_config import Plan
from stagewise.config.stage_config import StageConfig
from stagewise.errors import UserError

INIT = "init"  # `from: init`: the plan's model as built


@dataclass(frozen=True, eq=False)
class StageNode:
    index: int
    config: StageConfig
    parent: StageNode | None  # None: a root (the model as built)
    at: int | None  # the parent's step this stage branches from (`@STEP`); None: the parent's end

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def where(self) -> str:
        """The stage's key path in the plan, for error messages."""
        return f"stages[{self.index}]"

    @property
    def from_init(self) -> bool:
        """A root other than the first stage: it starts over from the model as built."""
        return self.parent is None and self.index > 0


def stage_tree(plan: Plan) -> list[StageNode]:
    """One node per stage, in plan order; a parent always comes before its children."""
    nodes: list[StageNode] = []
    by_name: dict[str, StageNode] = {}
    for i, cfg in enumerate(plan.stages):
        parent, at = _parent(cfg, i, nodes, by_name, [s.name for s in plan.stages])
        if cfg.merge is not None:
            cfg = _merge_config(cfg, i, parent)
        node = StageNode(i, cfg, parent, at)
        nodes.append(node)
        by_name[cfg.name] = node
    return nodes


def _parent(cfg: StageConfig, i: int, earlier: list[StageNode], by_name: dict[str, StageNode],
            names: list[str]) -> tuple[StageNode | None, int | None]:
    if cfg.from_ is None:
        return (earlier[-1] if earlier else None), None
    if cfg.from_ == INIT:
        return None, None
    name, _, step = cfg.from_.partition("@")
    if name not in by_name:
        if name in names:
            raise UserError(f"stages[{i}].from", f"stage '{name}' comes later: a parent comes before its branches")
        close = difflib.get_close_matches(name, [n for n in names[:i]] + [INIT], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"stages[{i}].from", f"no stage '{name}'{hint}")
    return by_name[name], (int(step) if step else None)



def _merge_config(cfg: StageConfig, i: int, parent: StageNode | None) -> StageConfig:
    """A merge stage averages its parent's checkpoints and evaluates them as the parent does: with
    the parent's task and data."""
    if parent is None:
        raise UserError(f"stages[{i}].merge", "a merge stage averages its parent's checkpoints: it needs a parent "
                                              "(not the first stage, nor from: init)")
    return cfg.model_copy(update={"task": parent.config.task, "data": parent.config.data})
