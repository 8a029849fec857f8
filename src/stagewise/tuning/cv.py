"""K-fold cross-validation of a labeled stage (`stagewise search --cv K`): the stage's training
records are split into K stratified folds fixed by the plan's seed (data.split.stratified_folds),
written once as JSON Lines files in the search directory; fold k's trial is the trial's plan with
that stage reading fold k as validation and the rest as training. Each fold is a plan of its own
(its data fingerprint, hence its stage key, differs), while the stages before it are shared."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

from stagewise.config.plan_config import Plan
from stagewise.data.split import stratified_folds
from stagewise.errors import UserError
from stagewise.plan.load import deep_merge
from stagewise.tasks.readers import read_labeled
from stagewise.tasks.spec import column, task_spec

FoldData = dict[str, Any]  # the raw `data` of the stage for one fold


def write_folds(plan: Plan, plan_path: Path, stage_name: str, k: int, out: Path) -> list[FoldData]:
    """The K folds of the stage's training file as files under `out`, and each fold's `data`."""
    index = next(i for i, s in enumerate(plan.stages) if s.name == stage_name)
    stage = plan.stages[index]
    spec = task_spec(stage.task)
    if "label" not in spec.traits.data_keys or not spec.traits.table_files:
        raise UserError("--cv", f"stage '{stage_name}' ({stage.task}) has no labeled table to stratify folds by "
                                "(cross-validation is for stages of labeled records, e.g. classify)")
    if k < 2:
        raise UserError("--cv", f"K folds need K >= 2 (got {k})")
    cfg = stage.data or plan.data
    where = f"stages[{index}].data" if stage.data is not None else "data"
    if not isinstance(cfg.train, str):
        raise UserError(f"{plan_path}: {where}.train", "cross-validation reads one local file")
    path = (plan_path.parent / cfg.train).expanduser()
    records = read_labeled(path, column(cfg, "field"), column(cfg, "label"), spec.table_format(cfg, where))
    counts = Counter(label for _, label in records)
    if len(records) < k:
        raise UserError("--cv", f"{len(records)} records in {path} cannot make {k} folds")
    rare = [label for label, n in counts.items() if n < 2]
    if rare:
        raise UserError("--cv", f"{path}: label '{rare[0]}' has one record: each label needs two, one to train on "
                                "whichever fold holds the other")
    folds = stratified_folds([label for _, label in records], k, plan.seed)
    directory = out / "folds" / stage_name
    directory.mkdir(parents=True, exist_ok=True)
    data = []
    for i, val in enumerate(folds):
        held = set(val)
        files = {}
        for part, rows in (("train", [r for r in range(len(records)) if r not in held]), ("val", val)):
            files[part] = directory / f"fold-{i}-{part}.jsonl"
            files[part].write_text("".join(json.dumps({"text": records[r][0], "label": records[r][1]}) + "\n"
                                           for r in rows), encoding="utf-8")
        data.append({"train": str(files["train"].resolve()), "val": str(files["val"].resolve()),
                     "field": "text", "label": "label", "format": "json"})
    return data


def fold_plan(raw: dict[str, Any], stage_name: str, fold: FoldData) -> dict[str, Any]:
    """The trial's raw plan with the stage reading one fold; its other data settings (max_len,
    ...) as the trial has them. A stage that reads the plan's `data` gets the fold as its own,
    unless no other stage reads the plan's: then the plan's `data` is the fold."""
    out = copy.deepcopy(raw)
    defaults = (out.get("defaults") or {}).get("data")
    stages = [s for s in out["stages"] if isinstance(s, dict)]
    stage = next(s for s in stages if s.get("name") == stage_name)

    def own(s: dict[str, Any]) -> dict[str, Any] | None:  # a stage's data after `defaults:`
        if s.get("data") is None:
            return defaults if isinstance(defaults, dict) else None
        return deep_merge(defaults, s["data"]) if isinstance(defaults, dict) else s["data"]

    base = own(stage)
    shared = base is None and any(own(s) is None for s in stages if s is not stage)
    data = {k: v for k, v in (base or out.get("data") or {}).items() if k != "val_fraction"}
    data.update(fold)
    if base is None and not shared:
        out["data"] = data
    else:
        stage["data"] = data
    return out
