"""Batch-size ramps (issue 18, item 1): the batch of every update against its closed form, the
tokens a run counts, the LR scaled with the batch, resume mid-ramp, and the plan's checks."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from conftest import metrics as _metrics
from conftest import resumes_identically, tiny_plan, write_plan
from conftest import run_plan as _run
from rich.console import Console

from stagewise.data.sampler import WindowSampler
from stagewise.engine.loop import micro_batches
from stagewise.engine.prepare_run import prepare
from stagewise.errors import UserError
from stagewise.optim.batch_ramp import floor_sum
from stagewise.optim.schedules import lr_at
from stagewise.plan.load import load_plan
from stagewise.plan.resolved import ResolvedStage
from stagewise.track.plan_view import print_plan

ADAMW = {"name": "adamw", "lr": 3e-3}


def _resolved(tmp: Path, corpus: Path, stage: dict[str, Any]) -> ResolvedStage:
    path = write_plan(tmp, tiny_plan(corpus, [{"name": "s", "optimizer": ADAMW, **stage}]))
    return prepare(load_plan(path), path, tmp / "cache").stages[0].resolved


def _closed_form(batch: dict[str, Any], step: int, total: int) -> int:
    """The sequences of update `step`, written from the definition (not from optim.batch_ramp)."""
    ramp, size = batch["ramp"], batch["size"]
    start = size * batch.get("accumulate", 1)
    end = ramp["to"] // size * size
    over = ramp["over"] if isinstance(ramp["over"], int) else round(ramp["over"] * total)
    if step >= over:
        return end
    if ramp.get("shape", "linear") == "linear":  # the line, rounded down to whole micro-batches
        line = start + Fraction(end - start) * step / over
        return math.floor(line / size) * size
    levels = (end - start) // ramp["increment"]
    return start + ramp["increment"] * math.floor(Fraction(levels * step, over))


@pytest.mark.parametrize("batch,steps,expected", [
    # size 2 -> 8 over 6 of 8 steps: 1, 1, 2, 2, 3, 3 micro-batches, then 4
    ({"size": 2, "ramp": {"to": 8, "over": 6}}, 8, [2, 2, 4, 4, 6, 6, 8, 8]),
    # a `to` of whole micro-batches plus 1 rounds down: 2 -> 8 (not 9)
    ({"size": 2, "ramp": {"to": 9, "over": 0.75}}, 8, [2, 2, 4, 4, 6, 6, 8, 8]),
    # Megatron's steps: 2 -> 10 in increments of 4 over 4 steps: two levels of two steps each
    ({"size": 2, "ramp": {"to": 10, "over": 4, "shape": "steps", "increment": 4}}, 6, [2, 2, 6, 6, 10, 10]),
    # from an accumulated start, 3 x 2 -> 12 over the whole stage: `to` would come at step 5, its end
    ({"size": 3, "accumulate": 2, "ramp": {"to": 12, "over": 1.0}}, 5, [6, 6, 6, 9, 9]),
])
def test_ramp_batches_per_step(tmp_path: Path, corpus: Path, batch: dict[str, Any], steps: int,
                               expected: list[int]) -> None:
    stage = _resolved(tmp_path, corpus, {"steps": steps, "batch": batch})
    got = [stage.sequences_at(s) for s in range(steps)]
    assert got == expected == [_closed_form(batch, s, steps) for s in range(steps)]
    assert stage.tokens_per_step is None  # not one number
    assert [stage.tokens_before(n) for n in range(steps + 1)] == [sum(got[:n]) * stage.block_size
                                                                   for n in range(steps + 1)]


@pytest.mark.parametrize("batch", [
    {"size": 4, "ramp": {"to": 64, "over": 0.37}},
    {"size": 5, "accumulate": 3, "ramp": {"to": 97, "over": 41}},
    {"size": 4, "ramp": {"to": 68, "over": 0.6, "shape": "steps", "increment": 16}},
])
def test_ramp_matches_its_definition_and_sums_in_closed_form(tmp_path: Path, corpus: Path,
                                                             batch: dict[str, Any]) -> None:
    steps = 97
    stage = _resolved(tmp_path, corpus, {"steps": steps, "batch": batch})
    per_step = [stage.sequences_at(s) for s in range(steps)]
    assert per_step == [_closed_form(batch, s, steps) for s in range(steps)]
    assert per_step == sorted(per_step) and per_step[0] < per_step[-1]
    assert all(stage.tokens_before(n) == sum(per_step[:n]) * stage.block_size for n in range(steps + 1))


def test_floor_sum_against_the_loop() -> None:
    for n, m, a, b in [(0, 3, 2, 1), (7, 3, 2, 1), (100, 7, 13, 5), (50, 50, 49, 0), (1000, 997, 3, 996)]:
        assert floor_sum(n, m, a, b) == sum((a * i + b) // m for i in range(n))


def test_tokens_and_epochs_stages_take_the_fewest_steps_that_hold_them(tmp_path: Path, corpus: Path) -> None:
    ramp = {"size": 4, "ramp": {"to": 16, "over": 0.5}}
    by_tokens = _resolved(tmp_path, corpus, {"tokens": 20_000, "batch": ramp})
    n = by_tokens.steps
    assert by_tokens.tokens_before(n) >= 20_000 > by_tokens.tokens_before(n - 1)
    by_epochs = _resolved(tmp_path, corpus, {"epochs": 2, "batch": ramp})
    wanted = 2 * by_epochs.windows_per_epoch * by_epochs.block_size
    assert by_epochs.tokens_before(by_epochs.steps) >= wanted > by_epochs.tokens_before(by_epochs.steps - 1)


def test_each_micro_batch_is_a_full_share_of_the_update(tmp_path: Path, corpus: Path) -> None:
    stage = _resolved(tmp_path, corpus, {"steps": 8, "batch": {"size": 2, "ramp": {"to": 8, "over": 6}}})
    path = write_plan(tmp_path, tiny_plan(corpus, [{"name": "s", "optimizer": ADAMW, "steps": 1}]))
    sampler = WindowSampler(prepare(load_plan(path), path, tmp_path / "cache").data.train, stage.block_size,
                            stage.batch_size, seed=1)
    for step in range(8):
        batches = list(micro_batches(sampler, stage, step))
        assert [b[0].size(0) for b, _ in batches] == [2] * (stage.sequences_at(step) // 2)
        assert {share for _, share in batches} == {1 / len(batches)}  # the update's loss: a mean over sequences


def test_a_run_logs_each_updates_batch_and_counts_its_tokens(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": ADAMW, "steps": 3},
              {"name": "r", "steps": 10, "batch": {"size": 2, "ramp": {"to": 8, "over": 0.6}}},
              {"name": "c", "tokens": 3000}]
    prepared, run = _run(tmp_path, corpus, stages)
    a, r, c = prepared.resolved
    block = r.block_size
    lines = _metrics(run, "train", "r")
    expected = [_closed_form(r.config.batch.model_dump(), s, 10) for s in range(10)]
    assert [m["batch"] for m in lines] == expected
    start = 3 * 8 * block  # stage a: 3 updates of the default batch of 8
    assert [m["tokens"] for m in lines] == [start + sum(expected[:n]) * block for n in range(1, 11)]
    after = start + sum(expected) * block
    assert _metrics(run, "train", "c")[0]["tokens"] == after + 8 * block  # the next stage counts on from there
    assert c.start_tokens == after


@pytest.mark.parametrize("scaling,power", [("linear", 1.0), ("sqrt", 0.5)])
def test_lr_scales_with_the_batch(tmp_path: Path, corpus: Path, scaling: str, power: float) -> None:
    batch = {"size": 2, "ramp": {"to": 8, "over": 6, "lr_scaling": scaling}}
    stages = [{"name": "r", "optimizer": ADAMW, "steps": 8, "schedule": {"name": "cosine", "warmup": 2},
               "batch": batch}]
    prepared, run = _run(tmp_path, corpus, stages)
    cfg = prepared.resolved[0].config
    for m in _metrics(run, "train"):
        step = m["stage_step"] - 1
        planned = lr_at(cfg.schedule, step, 8, 3e-3)
        assert m["lr"] == pytest.approx(planned * (_closed_form(batch, step, 8) / 2) ** power, rel=1e-12)
    assert prepared.resolved[0].lr(8) == pytest.approx(lr_at(cfg.schedule, 8, 8, 3e-3) * 4 ** power)


def test_resume_mid_ramp_is_bit_identical(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "r", "optimizer": ADAMW, "steps": 12, "eval": {"every": 4, "batches": 2},
               "batch": {"size": 2, "ramp": {"to": 8, "over": 0.75, "lr_scaling": "sqrt"}}}]
    whole = resumes_identically(tmp_path, corpus, stages, stop_after=5, checkpoint={"every": 3, "keep": 2})
    assert len({m["batch"] for m in _metrics(whole, "train")}) == 4  # cut mid-ramp: 2, 4, 6, 8


def test_check_shows_the_ramp(tmp_path: Path, corpus: Path) -> None:
    stage = _resolved(tmp_path, corpus, {"steps": 8, "batch": {"size": 2, "ramp": {
        "to": 10, "over": 4, "shape": "steps", "increment": 4, "lr_scaling": "sqrt"}}})
    console = Console(record=True, width=200)
    print_plan(console, "tiny", [stage], {"s": "train"})
    text = console.export_text()
    assert "2 x1 -> x5 x 32" in text and "ramp +4 x2 over 4 steps" in text and "lr x (batch/2)^0.5" in text
    assert f"{stage.tokens_before(8):,} tok in all" in text


@pytest.mark.parametrize("batch,message", [
    ({"size": 8, "ramp": {"to": 8, "over": 0.5}}, r"stages\[1\]\.batch\.ramp\.to: must be > the start batch"),
    ({"size": 8, "ramp": {"to": 15, "over": 0.5}}, r"ramp\.to: must be > .* 8 in whole micro-batches of 8"),
    ({"size": 8, "full": True, "ramp": {"to": 32, "over": 0.5}}, r"stages\[1\]\.batch\.ramp: not used with full"),
    ({"size": 8, "ramp": {"to": 32, "over": 0.5, "increment": 8}}, r"ramp\.increment: required by shape: steps"),
    ({"size": 8, "ramp": {"to": 32, "over": 0.5, "shape": "steps"}}, r"ramp\.increment: required by shape: steps"),
    ({"size": 8, "ramp": {"to": 32, "over": 0.5, "shape": "steps", "increment": 12}},
     r"ramp\.increment: must be a multiple of size 8"),
    ({"size": 8, "ramp": {"to": 48, "over": 0.5, "shape": "steps", "increment": 16}},
     r"ramp\.increment: to - size x accumulate = 40 must be a multiple of increment 16"),
    ({"size": 8, "ramp": {"to": 32, "over": 5}}, r"stages\[1\]\.batch\.ramp\.over: must be within the stage's 4"),
    ({"size": 8, "ramp": {"to": 32, "over": 0}}, r"stages\[1\]\.batch\.ramp\.over: must be > 0"),
    ({"size": 8, "ramp": {"to": 32, "over": 0.1}}, r"stages\[1\]\.batch\.ramp\.over: 0.1 of 4 steps is no step"),
])
def test_bad_ramps_are_one_line_errors(tmp_path: Path, corpus: Path, batch: dict[str, Any], message: str) -> None:
    stages = [{"name": "a", "optimizer": ADAMW, "steps": 4}, {"name": "b", "steps": 4, "batch": batch}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    with pytest.raises(UserError, match=message) as e:
        prepare(load_plan(path), path, tmp_path / "cache")
    assert "\n" not in str(e.value)


def test_a_ramp_on_full_batch_gradient_descent_is_refused(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(UserError, match=r"stages\[0\]\.batch\.ramp: optimizer gd takes the whole set"):
        _resolved(tmp_path, corpus, {"steps": 2, "optimizer": {"name": "gd", "lr": 0.1},
                                     "batch": {"size": 8, "ramp": {"to": 16, "over": 1}}})
