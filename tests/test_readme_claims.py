"""What the README says a stage takes from its parent, and what the cache and `--fresh` do, checked
on runs: a stage stopped early hands on its last weights; each stage reads its data from the start in
an order of its own name; `--fresh` deletes the run and this plan's stages, not the prepared data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_plan, write_plan
from rich.console import Console
from safetensors.torch import load_file

from stagewise.cli import main
from stagewise.engine.checkpoint import WEIGHTS, StageStore
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan

QUIET = Console(quiet=True)
ADAMW = {"name": "adamw", "lr": 3e-3}


def _prepared(tmp: Path, corpus: Path, stages: list[dict[str, Any]], tag: str, **top: Any) -> Prepared:
    path = write_plan(tmp, tiny_plan(corpus, stages, **top), f"{tag}.yaml")
    return prepare(load_plan(path), path, tmp / f"{tag}-cache")


def test_a_stage_stopped_early_hands_on_its_last_weights(tmp_path: Path, corpus: Path) -> None:
    # min_delta 100: no evaluation after the first counts as better, so the stage stops at the
    # second (step 4), while the first (step 2) stays its best
    stages = [{"name": "a", "optimizer": ADAMW, "steps": 40, "eval": {"every": 2, "batches": 2},
               "until": {"plateau": {"patience": 0, "min_delta": 100.0}}},
              {"name": "b", "optimizer": {"lr": 1e-3}, "steps": 2}]
    prepared = _prepared(tmp_path, corpus, stages, "stop", checkpoint={"every": 2, "keep": 10})
    train(prepared, tmp_path / "stop", console=QUIET)
    events = read_jsonl(tmp_path / "stop" / "events.jsonl")
    (stopped,) = [e for e in events if e["event"] == "stage_stopped_early"]
    assert stopped["stage_step"] == 4
    store = StageStore(prepared.cache_root, prepared.stages[0].key)
    manifest = store.final_manifest()
    assert manifest is not None and manifest["step"] == 4  # what `b` loads (engine.run_plan._load_parent)
    final = load_file(store.final_dir / WEIGHTS)
    at_stop, at_best = load_file(store.step_dir(4) / WEIGHTS), load_file(store.step_dir(2) / WEIGHTS)
    assert all(torch.equal(final[k], at_stop[k]) for k in final)
    assert not all(torch.equal(final[k], at_best[k]) for k in final)
    exported = load_file(tmp_path / "stop" / "stages" / "a" / "model.safetensors")
    assert all(torch.equal(exported[k], final[k]) for k in exported.keys() & final.keys())


def _training_batches(prepared: Prepared, stage_index: int) -> list[torch.Tensor]:
    """Train the plan; the input ids of every training forward of the stage's model, in order."""
    seen: list[torch.Tensor] = []
    model = prepared.stages[stage_index].setup.model

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:
            seen.append(kwargs["input_ids"].detach().cpu().clone())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        train(prepared, prepared.cache_root.parent / f"run-{prepared.cache_root.name}", console=QUIET)
    finally:
        handle.remove()
    return seen


def test_each_stage_reads_its_data_from_the_start_in_its_own_order(tmp_path: Path, corpus: Path) -> None:
    lone_x = _training_batches(_prepared(tmp_path, corpus, [{"name": "x", "optimizer": ADAMW, "steps": 3}], "x"), 0)
    lone_y = _training_batches(_prepared(tmp_path, corpus, [{"name": "y", "optimizer": ADAMW, "steps": 3}], "y"), 0)
    after = _training_batches(_prepared(tmp_path, corpus, [{"name": "w", "optimizer": ADAMW, "steps": 5},
                                                           {"name": "x", "steps": 3}], "wx"), 1)
    assert len(lone_x) == len(lone_y) == 3 and len(after) == 8
    assert all(torch.equal(a, b) for a, b in zip(after[5:], lone_x, strict=True))  # x after w: x's own start
    assert not torch.equal(lone_x[0], lone_y[0])  # another name, another order
    assert not torch.equal(after[5], after[0])  # not w's order either


def test_fresh_deletes_the_run_and_this_plans_stages_not_the_prepared_data(
        tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = write_plan(tmp_path, tiny_plan(corpus, [{"name": "a", "optimizer": ADAMW, "steps": 3}]))
    other = write_plan(tmp_path, tiny_plan(corpus, [{"name": "z", "optimizer": ADAMW, "steps": 2}]), "other.yaml")
    assert main(["train", str(plan), "--out", "runs/x"]) == 0
    assert main(["train", str(other), "--out", "runs/other"]) == 0
    cache = tmp_path / "runs" / ".cache"
    stages = {d.name for d in (cache / "stages").iterdir()}
    tokens = {p.name: p.stat().st_mtime_ns for p in (cache / "tokens").iterdir()}
    assert len(stages) == 2 and tokens
    (tmp_path / "runs" / "x" / "note.txt").write_text("mine")

    assert main(["train", str(plan), "--out", "runs/x", "--fresh"]) == 0
    assert not (tmp_path / "runs" / "x" / "note.txt").exists()
    events = read_jsonl(tmp_path / "runs" / "x" / "events.jsonl")
    assert [e["event"] for e in events if e.get("stage") == "a"][:1] == ["optimizer_reset"]
    assert not any(e["event"] == "stage_reused" for e in events)  # trained again
    assert {d.name for d in (cache / "stages").iterdir()} == stages  # the other plan's stage is still there
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "tokens").iterdir()} == tokens  # not rebuilt
    assert main(["train", str(other), "--out", "runs/other"]) == 0
    assert any(e["event"] == "stage_reused" for e in read_jsonl(tmp_path / "runs" / "other" / "events.jsonl")
               if e.get("stage") == "z")
