"""What a run says about where it is: a resumed stage says so (console and events), and after an
early stop the next stage goes on at the step where its parent really ended."""

from __future__ import annotations

import io
import json
from pathlib import Path

from conftest import events as _events
from conftest import tiny_plan, write_plan
from rich.console import Console

from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_plan import train
from stagewise.errors import RunStopped
from stagewise.plan.load import load_plan


def test_a_resumed_stage_says_where_it_resumes_from(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 12}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages, checkpoint={"every": 4}))
    cache, run = tmp_path / "cache", tmp_path / "run"
    try:
        train(prepare(load_plan(path), path, cache), run, console=Console(quiet=True), stop_after=6)
    except RunStopped:
        pass
    out = io.StringIO()
    train(prepare(load_plan(path), path, cache), run, console=Console(file=out, width=200))
    checkpoint = cache / "stages" / _events(run, "stage_start")[0]["key"] / "step-00000006"
    assert f"[a] resuming at step 6 of 12 from {checkpoint}" in out.getvalue()
    assert "[a] start:" not in out.getvalue().split("resuming")[1]
    (resumed,) = _events(run, "stage_resumed")
    assert (resumed["stage_step"], resumed["checkpoint"]) == (6, str(checkpoint))


def test_after_an_early_stop_the_next_stage_starts_where_it_ended(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 40, "eval": {"every": 5},
               "until": {"target": {"metric": "val_loss", "value": 99.0}}},  # holds at the first evaluation
              {"name": "b", "steps": 5}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    run = tmp_path / "run"
    train(prepare(load_plan(path), path, tmp_path / "cache"), run, console=Console(quiet=True))
    steps = [m["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if (m := json.loads(line))["kind"] == "train"]
    assert steps == [5, 10]  # a: 5 updates, then b's 5 go on from there (not from 40)
    assert [e["step"] for e in _events(run, "stage_end")] == [5, 10]
    # A rerun reuses both stages and places them the same way.
    train(prepare(load_plan(path), path, tmp_path / "cache"), tmp_path / "again", console=Console(quiet=True))
    assert [e["step"] for e in _events(tmp_path / "again", "stage_reused")] == [0, 5]
