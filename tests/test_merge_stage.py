"""Merge stages (issue 18): a stage that trains nothing, its weights the mean of its parent's
checkpoints (WSM's checkpoint merging instead of a decay), evaluated, cached, exported and
continued from like any stage's end, and drawn as a branch beside a cooldown from the same parent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import events, metrics, stage_weights, tiny_plan, write_plan
from safetensors.torch import load_file

from stagewise.cli import main
from stagewise.engine.checkpoint import StageStore
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_plan import train
from stagewise.errors import UserError
from stagewise.plan.load import load_plan
from stagewise.track.plots import loss_figure
from stagewise.track.runs import load_run

CONST = {"name": "const", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 12}
EVERY = {"checkpoint": {"every": 4, "keep": 1}}  # keep 1: the steps a merge averages are kept regardless


def _train(tmp: Path, corpus: Path, stages: list[dict[str, Any]], tag: str, **top: Any) -> tuple[Prepared, Path]:
    """Train into tmp/<tag>, with one stage cache for every run of the test."""
    path = write_plan(tmp, tiny_plan(corpus, stages, **{**EVERY, **top}), f"{tag}.yaml")
    prepared = prepare(load_plan(path), path, tmp / "cache")
    train(prepared, tmp / tag)
    return prepared, tmp / tag


def _file(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@pytest.mark.parametrize("weights,coefficients", [("uniform", [1 / 3, 1 / 3, 1 / 3]), ("linear", [1 / 6, 2 / 6, 3 / 6])])
def test_merge_is_the_weighted_mean_of_the_parents_checkpoints(tmp_path: Path, corpus: Path, weights: str,
                                                               coefficients: list[float]) -> None:
    merge = {"name": "m", "from": "const", "merge": {"last": 3, "weights": weights}}
    prepared, run = _train(tmp_path, corpus, [CONST, merge], "run")
    parent = StageStore(prepared.cache_root, prepared.stages[0].key)
    assert {4, 8} <= set(parent.steps())  # pinned, though checkpoint.keep is 1
    saved = [_file(parent.step_dir(4)), _file(parent.step_dir(8)), _file(parent.final_dir)]
    merged = _file(StageStore(prepared.cache_root, prepared.stages[1].key).final_dir)
    assert merged.keys() == saved[0].keys()
    for name, tensor in merged.items():
        expected = sum(c * s[name].double() for c, s in zip(coefficients, saved, strict=True))
        assert torch.allclose(tensor.double(), expected, rtol=0, atol=1e-6), name  # type: ignore[arg-type]
    if weights == "uniform":  # exactly the elementwise mean
        assert all(torch.allclose(t, torch.stack([s[n] for s in saved]).mean(0), rtol=1e-6, atol=1e-7)
                   for n, t in merged.items())
    assert not all(torch.equal(t, saved[-1][n]) for n, t in merged.items())  # not the parent's end
    exported = stage_weights(run, "m")  # GPT-2's tied embedding is in the store as lm_head.weight
    assert exported and all(torch.equal(t, merged.get(n, merged["lm_head.weight"])) for n, t in exported.items())
    (event,) = events(run, "merge")
    assert event["parent_steps"] == [4, 8, 12] and event["step"] == 12
    (evaluated,) = metrics(run, "eval", "m")  # evaluated as a stage's end, on the parent's step axis
    assert evaluated["step"] == 12 and evaluated["val_loss"] != metrics(run, "eval", "const")[-1]["val_loss"]
    summary = StageStore(prepared.cache_root, prepared.stages[1].key).final_manifest()["summary"]  # type: ignore[index]
    assert summary["val_loss"] == evaluated["val_loss"] and summary["steps"] == 0
    assert summary["optimizer"] == "merge"  # no updates: not named after the parent's optimizer
    assert [e["optimizer"] for e in events(run, "stage_start")] == ["adamw", "merge"]


def test_merge_is_reused_continued_from_and_drawn_beside_a_cooldown(tmp_path: Path, corpus: Path) -> None:
    stages = [CONST, {"name": "cool", "from": "const@8", "optimizer": {"handoff": "carry"},
                      "schedule": {"name": "decay", "shape": "1-sqrt"}, "steps": 4},
              {"name": "m", "from": "const", "merge": {"last": 2}}, {"name": "after", "steps": 3}]
    first, run = _train(tmp_path, corpus, stages, "first")
    assert not events(run, "stage_reused")
    again, rerun = _train(tmp_path, corpus, stages, "again")
    assert {e["stage"] for e in events(rerun, "stage_reused")} == {"const", "cool", "m", "after"}
    assert [s.key for s in again.stages] == [s.key for s in first.stages]
    # not evaluated again: its evaluation is the one the first run logged, brought back from the cache
    assert metrics(rerun, "eval", "m") == metrics(run, "eval", "m") != [] and _same_export(run, rerun, "m")
    # Another merge of the same checkpoints is another stage; the parent is not trained again.
    other_merge = {"name": "m", "from": "const", "merge": {"from": 8, "to": 12, "weights": "linear"}}
    other, third = _train(tmp_path, corpus, [CONST, other_merge], "other")
    assert other.stages[1].key != first.stages[2].key
    assert [e["stage"] for e in events(third, "stage_reused")] == ["const"]
    assert events(third, "merge")[0]["parent_steps"] == [8, 12]
    # The child continued from the merged weights, at the LR its grandparent ended on.
    (start,) = [e for e in events(run, "stage_start") if e["stage"] == "after"]
    assert start["parent"] == "m" and start["step"] == 12 and start["settings"]["lr"] == 3e-3
    series = {line.get_label() for ax in loss_figure(load_run(run)).axes for line in ax.get_lines()
              if (line.get_gid() or "").startswith("series:")}
    assert {"const@8 → cool: val loss", "const → m → after: val loss"} <= series


def _same_export(a: Path, b: Path, stage: str) -> bool:
    x, y = stage_weights(a, stage), stage_weights(b, stage)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


MERGE = {"name": "m", "from": "a", "merge": {"last": 2}}


@pytest.mark.parametrize("stages,top,message", [
    ([{**MERGE, "optimizer": {"lr": 1e-3}}], {}, r"stages\[1\]\.optimizer: not for a merge stage"),
    ([{**MERGE, "steps": 4}], {}, r"stages\[1\]\.steps: not for a merge stage"),
    ([{**MERGE, "merge": {"weights": "linear"}}], {}, r"stages\[1\]\.merge\.last: give last, or from and to"),
    ([{**MERGE, "merge": {"last": 3}}], {},
     r"stages\[1\]\.merge\.last: stage 'a' has 2 checkpoints up to step 8 at checkpoint\.every 4: set "
     r"checkpoint\.every <= 3 or merge\.last <= 2$"),
    ([MERGE], {"checkpoint": {"keep": 1}}, r"stages\[1\]\.merge: averages checkpoints of stage 'a': set checkpoint\.every"),
    ([{**MERGE, "merge": {"from": 2, "to": 10}}], {}, r"stages\[1\]\.merge\.to: stage 'a' ends at step 8 \(got 10\)"),
    ([{**MERGE, "merge": {"from": 5, "to": 7}}], {}, r"stages\[1\]\.merge\.from: stage 'a' has 0 checkpoint\(s\)"),
    ([MERGE, {"name": "c", "optimizer": {"handoff": "carry"}, "steps": 2}], {},
     r"stages\[2\]\.optimizer\.handoff: stage 'm' is a merge: it hands on weights only \(use reset\)"),
])
def test_bad_merge_stages_are_one_line_errors(tmp_path: Path, corpus: Path, stages: list[dict[str, Any]],
                                              top: dict[str, Any], message: str) -> None:
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 8}, *stages],
                     **{"checkpoint": {"every": 4}, **top})
    path = write_plan(tmp_path, plan)
    with pytest.raises(UserError, match=message):
        prepare(load_plan(path), path, tmp_path / "cache")


@pytest.mark.parametrize("first,message", [
    ({"average": {"ema": 0.9}}, "stages[1].merge: stage 'a' ends on its EMA, not on its last update's weights"),
    ({"until": {"time": {"minutes": 5}}}, "stages[1].merge: stage 'a' may end early (until, next_stage)"),
])
def test_check_refuses_a_merge_of_a_parent_it_cannot_average(tmp_path: Path, corpus: Path, first: dict[str, Any],
                                                             message: str, capsys: pytest.CaptureFixture[str]) -> None:
    stages = [{"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 8, **first}, MERGE]
    path = write_plan(tmp_path, tiny_plan(corpus, stages, checkpoint={"every": 4}))
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: {message}"), err
