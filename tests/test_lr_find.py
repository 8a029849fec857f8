"""`stagewise lr-find`: the suggestion lands where training at a fixed LR does best; a stage's
starting weights come through the engine and the stage cache; nothing is left changed."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_plan, write_plan
from rich.console import Console

from stagewise.cli import main
from stagewise.engine.context import RunContext
from stagewise.engine.device import autocast_factory
from stagewise.engine.prepare_run import prepare
from stagewise.engine.progress import ProgressView
from stagewise.engine.run_logs import RunLogs, read_jsonl
from stagewise.engine.run_plan import train
from stagewise.engine.stage_optimizer import StageOptimizer
from stagewise.engine.status import stage_status
from stagewise.plan.load import load_plan
from stagewise.tuning.lr_find import lr_find, restored_sweep, suggestions

GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
STAGE = {"optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 60}



def _quiet(tmp_path: Path) -> Console:
    return Console(file=(tmp_path / "console.txt").open("a"), width=160)


def test_the_suggestion_lands_where_a_fixed_lr_trains_best(tmp_path: Path, corpus: Path) -> None:
    # The known-good range, measured: the same stage trained from the same initial weights at
    # each LR of a grid (branches from init, one plan); good = within 0.25 of the best val loss.
    grid = [{**STAGE, "name": f"lr{i}", "from": "init", "optimizer": {"name": "adamw", "lr": lr}}
            for i, lr in enumerate(GRID)]
    path = write_plan(tmp_path, tiny_plan(corpus, grid), "grid.yaml")
    summaries = train(prepare(load_plan(path), path, tmp_path / "cache"), tmp_path / "grid", console=_quiet(tmp_path))
    losses = {lr: s.val_loss for lr, s in zip(GRID, summaries, strict=True)}
    best = min(losses.values())
    good = [lr for lr, loss in losses.items() if loss <= best + 0.25]  # type: ignore[operator]
    assert GRID[0] not in good and GRID[-1] not in good  # the grid brackets the good range

    path = write_plan(tmp_path, tiny_plan(corpus, [{**STAGE, "name": "fit"}]), "plan.yaml")
    found = lr_find(path, [], "fit", start=1e-5, end=10.0, steps=60, out=tmp_path / "lr", cache=tmp_path / "cache",
                    console=_quiet(tmp_path))
    assert "4x its minimum" in found.stopped  # it ran until the loss diverged
    assert found.steep is not None and found.minimum is not None
    for suggested in (found.steep, found.minimum):
        assert min(good) / 3 <= suggested <= max(good) * 3, (suggested, losses)
    assert found.plot.stat().st_size > 5000


def test_suggestions_follow_fastai() -> None:
    lrs = [10 ** (-6 + i / 10) for i in range(60)]
    # flat, a descent steepest at index 30, a minimum at index 45, then up
    smooth = [3.0 if i < 25 else 3.0 - 0.02 * (i - 25) - (0.08 if i > 30 else 0.0) if i <= 45 else 2.6 + 0.1 * (i - 45)
              for i in range(60)]
    steep, minimum = suggestions(lrs, smooth)
    assert steep == pytest.approx(lrs[30])
    assert minimum == pytest.approx(lrs[45] / 10)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_lr_find_starts_from_the_parent_and_changes_nothing(tmp_path: Path, corpus: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    stages = [{"name": "warm", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 12},
              {"name": "tune", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "steps": 30}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    cache, written = tmp_path / "cache", tmp_path / "tuned.yaml"
    args = ["lr-find", str(path), "--stage", "tune", "--start", "1e-4", "--end", "10", "--steps", "20",
            "--cache", str(cache)]
    assert main([*args, "--out", str(tmp_path / "lr1"), "--write", str(written)]) == 0
    printed = capsys.readouterr().out
    assert "suggested LR: steepest descent" in printed and "plan written to" in printed
    # the parent was trained through the engine, as a plan of its own, into the stage cache
    prefix = read_jsonl(tmp_path / "lr1/prefix/events.jsonl")
    assert [e["stage"] for e in prefix if e["event"] == "stage_start"] == ["warm"]
    assert stage_status(prepare(load_plan(path), path, cache)) == {"warm": "reuse", "tune": "train"}
    found = json.loads((tmp_path / "lr1/tune/lr_find.json").read_text())
    tuned = load_plan(written)
    assert tuned.stages[1].optimizer.lr == pytest.approx(found["minimum"])
    assert tuned.stages[0] == load_plan(path).stages[0]

    # a second test from the cached parent: no training, and the stage cache is byte for byte the same
    before = _digests(cache / "stages")
    assert main([*args, "--out", str(tmp_path / "lr2")]) == 0
    assert not (tmp_path / "lr2/prefix").exists()
    assert _digests(cache / "stages") == before
    capsys.readouterr()

    # bad input: one line, exit 2, nothing written
    assert main([*args, "--out", str(tmp_path / "lr3"), "--write", str(written)]) == 2
    assert capsys.readouterr().err == f"error: {written}: exists: lr-find writes a new plan, never over a file\n"
    assert main(["lr-find", str(path), "--stage", "tun"]) == 2
    assert capsys.readouterr().err == "error: --stage: no stage 'tun' (stages: warm, tune)\n"
    assert main(["lr-find", str(path), "--stage", "tune", "--start", "1", "--end", "0.1"]) == 2
    assert capsys.readouterr().err == "error: --start/--end: need 0 < start < end (got 1, 0.1)\n"


def test_a_merge_stage_has_no_lr_to_find(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stages = [{**STAGE, "name": "a", "steps": 4}, {"name": "m", "from": "a", "merge": {"last": 2}}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages, checkpoint={"every": 2}))
    assert main(["lr-find", str(path), "--stage", "m", "--out", str(tmp_path / "lr")]) == 2
    assert capsys.readouterr().err == "error: --stage: stage 'm' merges checkpoints: it has no LR to find\n"
    assert not (tmp_path / "lr").exists()


def test_the_sweep_leaves_weights_and_optimizer_state_as_they_were(tmp_path: Path, corpus: Path) -> None:
    stage_cfg = {**STAGE, "name": "fit", "optimizer": {"name": "adam", "lr": 1e-3}}
    path = write_plan(tmp_path, tiny_plan(corpus, [stage_cfg]))
    prepared = prepare(load_plan(path), path, tmp_path / "cache")
    stage = prepared.stages[0]
    cfg = stage.resolved.config
    device = torch.device("cpu")
    task = stage.spec.bind(stage.setup, cfg, prepared.plan.data, device, autocast_factory(device, None), False)
    optimizer = StageOptimizer(stage.resolved, task.model, stage.layers)
    # some optimizer state to keep: one real update first
    task.loss(task.sampler(32, 8, 0).next_batch()).backward()
    optimizer.optimizer.step()
    optimizer.optimizer.zero_grad()
    weights = {k: v.clone() for k, v in task.model.state_dict().items()}
    state = optimizer.optimizer.state_dict()
    moments = {k: {n: t.clone() for n, t in v.items()} for k, v in state["state"].items()}
    run = RunContext(plan=prepared.plan, run_dir=tmp_path / "run", device=device,
                     autocast=autocast_factory(device, None), logs=RunLogs(tmp_path),
                     view=ProgressView(10, _quiet(tmp_path)))
    lrs, smooth, _, _ = restored_sweep(run, stage, task, optimizer, 1e-4, 1.0, 12)
    run.logs.close()
    assert len(lrs) >= 10 and lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    assert task.model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in task.model.state_dict().items())
    after = optimizer.optimizer.state_dict()["state"]
    assert after.keys() == moments.keys()
    assert all(torch.equal(t, moments[k][n]) for k, v in after.items() for n, t in v.items())


def test_a_flat_curve_has_no_suggestion() -> None:
    lrs = [10 ** (-9 + i / 10) for i in range(40)]
    noise = [3.0 + 0.004 * ((i * 7) % 5 - 2) for i in range(40)]  # wobbles, never falls 0.5%
    assert suggestions(lrs, noise) == (None, None)
    falling = [3.0 - 0.001 * i for i in range(40)]  # falls 1%
    assert suggestions(lrs, falling) != (None, None)


def test_lr_find_says_when_the_sweep_finds_no_descent(tmp_path: Path, corpus: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path, tiny_plan(corpus, [{**STAGE, "name": "fit"}]))
    written = tmp_path / "tuned.yaml"
    # LRs far below where the stage learns: the loss does not move
    assert main(["lr-find", str(path), "--stage", "fit", "--start", "1e-12", "--end", "1e-10", "--steps", "10",
                 "--out", str(tmp_path / "lr"), "--cache", str(tmp_path / "cache"), "--write", str(written)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert re.search(r"no suggested LR: no usable descent: the smoothed loss fell 0\.[0-4]% before its minimum "
                     r"\(a suggestion needs 0\.5%\)", printed)
    assert "steepest" not in printed and "no plan written (no suggestion)" in printed
    assert not written.exists()
    assert json.loads((tmp_path / "lr/fit/lr_find.json").read_text())["steep"] is None
    # `stagewise runs` shows the folder as what it is, not as an interrupted run of no stages
    assert main(["runs", str(tmp_path / "lr")]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    assert "lr-find stage 'fit': no suggestion (no usable descent)" in listed and "interrupted" not in listed


PLAN_TEXT = """\
# A plan as a person writes it: comments, flow mappings, a quoted path, its own indentation.
name: tiny
seed: 7
precision: fp32
model: {arch: gpt2, n_layer: 2, n_head: 2, n_embd: 32, n_positions: 32}
tokenizer: {kind: char}
data:
    train: "text/corpus.txt"   # relative to this file
    val_fraction: 0.1
defaults:
    batch: {size: 8}
    eval: {batches: 10}
stages:
    - name: fit    # the stage lr-find sweeps
      optimizer: {name: adamw, lr: 1e-3}   # Adam's usual
      steps: 60
"""


def test_write_keeps_the_plans_comments_and_layout(tmp_path: Path, corpus: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plans = tmp_path / "plans"
    (plans / "text").mkdir(parents=True)
    (plans / "text" / "corpus.txt").write_bytes(corpus.read_bytes())
    path = plans / "plan.yaml"
    path.write_text(PLAN_TEXT, encoding="utf-8")
    written = tmp_path / "tuned" / "tuned.yaml"
    written.parent.mkdir()
    found = lr_find(path, [], "fit", start=1e-4, end=10.0, steps=20, out=tmp_path / "lr", cache=tmp_path / "cache",
                    write=written, console=_quiet(tmp_path))
    assert found.minimum is not None
    lr = yaml.safe_load(written.read_text())["stages"][0]["optimizer"]["lr"]
    assert lr == found.minimum
    # only the LR and the path (now relative to the written plan) changed; every comment stays (one
    # space after a value that grew past its comment's column)
    assert written.read_text(encoding="utf-8") == PLAN_TEXT.replace("lr: 1e-3}   #", f"lr: {lr}}} #").replace(
        '"text/corpus.txt"   #', '"../plans/text/corpus.txt" #')
    assert load_plan(written).data.train == "../plans/text/corpus.txt"
    assert main(["check", str(written)]) == 0
    assert main(["runs", str(tmp_path / "lr")]) == 0
    assert f"lr-find stage 'fit': minimum / 10 {found.minimum:.2e}, steepest {found.steep:.2e}" in \
        " ".join(capsys.readouterr().out.split())
