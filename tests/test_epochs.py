"""`eval.each_epoch` evaluates once per epoch: a stage of E epochs is evaluated E times, the last
at its end, whether the batch divides the data or not (the window sampler runs on into the next
pass within an update; the example sampler ends a pass on a smaller batch), with accumulation, a
whole-set batch or a ramp, and when it is resumed mid-epoch or on an epoch's end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import metrics, resumes_identically, run_plan

ADAMW = {"name": "adamw", "lr": 1e-3}
WINDOWS, BLOCK = 60, 16  # the text below: 60 training windows of 16 characters


def _text(tmp: Path) -> dict[str, Any]:
    """The plan's data: 60 x 16 + 1 characters to train on (char tokenizer), a line to validate on."""
    train, val = tmp / "train.txt", tmp / "val.txt"
    train.write_text(("to be or not to be, that is the question. " * 30)[:WINDOWS * BLOCK + 1], encoding="utf-8")
    val.write_text("whether tis nobler in the mind to suffer the slings and arrows", encoding="utf-8")
    return {"train": str(train), "val": str(val)}


def _lm_stage(batch: dict[str, Any], epochs: int = 3) -> list[dict[str, Any]]:
    return [{"name": "a", "optimizer": ADAMW, "epochs": epochs, "batch": {"block_size": BLOCK, **batch},
             "eval": {"each_epoch": True, "batches": 1}}]


def _eval_steps(run: Path) -> list[int]:
    return [m["stage_step"] for m in metrics(run, "eval", "a")]


def _once_per_epoch(run: Path, stage: Any, epochs: int) -> None:
    """E evaluations, the last at the stage's end, one epoch (the same number of updates) apart."""
    steps = _eval_steps(run)
    assert len(steps) == epochs and steps[-1] == stage.steps, steps
    assert steps == [steps[0] * k for k in range(1, epochs + 1)], steps


@pytest.mark.parametrize("batch", [{"size": 12}, {"size": 13}, {"size": 7}, {"size": 4, "accumulate": 2},
                                   {"size": 12, "full": True}])
def test_a_causal_lm_stage_is_evaluated_once_per_epoch(tmp_path: Path, corpus: Path, batch: dict[str, Any]) -> None:
    # 12 divides the 60 windows; 13, 7 and 4 x 2 do not: the sampler's third pass ends an update
    # before the stage's third epoch does (where each_epoch evaluated twice, one update apart).
    prepared, run = run_plan(tmp_path, corpus, _lm_stage(batch), data=_text(tmp_path))
    stage = prepared.resolved[0]
    assert stage.windows_per_epoch == WINDOWS
    _once_per_epoch(run, stage, 3)


def test_a_ramped_stage_is_evaluated_once_per_pass(tmp_path: Path, corpus: Path) -> None:
    stages = _lm_stage({"size": 4, "ramp": {"to": 16, "over": 6}}, epochs=3)
    prepared, run = run_plan(tmp_path, corpus, stages, data=_text(tmp_path))
    stage, steps = prepared.resolved[0], _eval_steps(run)
    assert len(steps) == 3 and steps[-1] == stage.steps
    # each evaluation follows the update that completes a pass over the 60 windows
    assert [stage.ramp.sequences_before(s) // WINDOWS for s in steps] == [1, 2, 3]
    assert [stage.ramp.sequences_before(s - 1) // WINDOWS for s in steps] == [0, 1, 2]


@pytest.mark.parametrize(("examples", "batch"), [(30, {"size": 6}), (30, {"size": 7}), (30, {"size": 4, "accumulate": 3})])
def test_a_classify_stage_is_evaluated_once_per_epoch(tmp_path: Path, corpus: Path, examples: int,
                                                      batch: dict[str, Any]) -> None:
    # The example sampler ends a pass on a smaller batch; with accumulation an update runs on
    # into the next pass (8 micro-batches a pass, 3 an update: the third pass ends at update 8,
    # the stage's third epoch at 9).
    train, val = tmp_path / "train.tsv", tmp_path / "val.tsv"
    train.write_text("".join(f"{'ab'[i % 2]}\t{'xy'[i % 2]} w{i}\n" for i in range(examples)), encoding="utf-8")
    val.write_text("a\tx v\nb\ty v\n", encoding="utf-8")
    stages = [{"name": "a", "task": "classify", "optimizer": ADAMW, "epochs": 3, "batch": batch,
               "eval": {"each_epoch": True}}]
    prepared, run = run_plan(tmp_path, corpus, stages,
                             data={"train": str(train), "val": str(val), "field": 1, "label": 0, "max_len": 8})
    stage = prepared.resolved[0]
    assert stage.windows_per_epoch == examples
    _once_per_epoch(run, stage, 3)


@pytest.mark.parametrize("stop_after", [7, 10])
def test_a_stage_resumed_mid_epoch_or_on_its_end_is_evaluated_as_one_never_cut(tmp_path: Path, corpus: Path,
                                                                              stop_after: int) -> None:
    # batch 13: 5 updates an epoch; cut inside the second epoch (7) and on its end (10)
    data = _text(tmp_path)
    whole = resumes_identically(tmp_path, corpus, _lm_stage({"size": 13}), stop_after, data=data)
    assert _eval_steps(whole) == _eval_steps(tmp_path / "cut") == [5, 10, 15]
