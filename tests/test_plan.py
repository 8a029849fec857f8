"""Plan files: validation before anything runs, one line naming the file and key path, exit 2."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_plan, write_plan

from stagewise.cli import main
from stagewise.errors import UserError
from stagewise.plan.load import load_plan

ADAMW = {"name": "adamw", "lr": 1e-3}


def _base(corpus: Path) -> dict[str, Any]:
    return tiny_plan(corpus, [
        {"name": "a", "optimizer": dict(ADAMW), "steps": 40},
        {"name": "b", "steps": 40},
    ])


def _set(path: str, value: Any):
    def mutate(plan: dict[str, Any]) -> None:
        node: Any = plan
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = value
    return mutate


BAD_PLANS = [
    (_set("stages.0.optimzer", {}), "stages[0].optimzer: unknown key (did you mean 'optimizer'?)"),
    (_set("stages.0.optimizer.lr", -1.0), "stages[0].optimizer.lr: input should be greater than 0 (got -1.0)"),
    (_set("stages.0.optimizer.momentum", 0.9),
     "stages[0].optimizer.momentum: not a setting of optimizer 'adamw' (it takes: betas, eps, lr, weight_decay)"),
    (_set("stages.1.schedule", {"name": "cosine", "gama": 0.5}),
     "stages[1].schedule.gama: unknown key (did you mean 'gamma'?)"),
    (_set("stages.1.schedule", {"name": "warmup_cosine"}), "stages[1].schedule.warmup: required by a warmup_* schedule"),
    (_set("stages.1.schedule", {"name": "step"}), "stages[1].schedule.step_size: required by schedule 'step'"),
    (_set("stages.1.schedule", {"name": "wsd", "warmup": 1.5}),
     "stages[1].schedule.warmup: must be a step count (int >= 0) or a fraction of the stage in [0, 1] (got 1.5)"),
    (_set("stages.1.epochs", 2), "stages[1].steps: give exactly one of steps, epochs, tokens (got steps, epochs)"),
    (_set("defaults.batch", {"sise": 3}), "defaults.batch.sise: unknown key (did you mean 'size'?)"),
    (_set("tokenizer", {"kind": "bpe"}), "tokenizer.vocab_size: required by kind 'bpe'"),
    (_set("modle", {}), "modle: unknown key (did you mean 'model'?)"),
    (_set("stages.1.name", "a"), "stages[1].name: 'a' is already the name of stages[0]"),
    # checked against the data and the model, still before training
    (_set("stages.1.schedule", {"name": "warmup_cosine", "warmup": 500}),
     "stages[1].schedule.warmup: must be < steps (got 500 >= 40)"),
    (_set("stages.1.optimizer", {"name": "sgd"}), "stages[1].optimizer.lr: required when switching from adamw to sgd"),
    (_set("stages.1.optimizer", {"momentum": 0.9}),
     "stages[1].optimizer.momentum: not a setting of optimizer 'adamw' (inherited from stage 'a')"),
    (_set("stages.0.batch", {"size": 4, "block_size": 64}),
     "stages[0].batch.block_size: must be <= the model's context length 32 (got 64)"),
    (_set("model.n_layr", 2), "model.n_layr: not a config key of gpt2 (did you mean 'n_layer'?)"),
    (_set("model.arch", "gtp2"), "model.arch: 'gtp2' is not a causal-LM architecture of transformers (did you mean 'gpt2'?)"),
    (_set("data.train", "nope/*.txt"), "data.train: no file matches"),
    (_set("stages.1.until", {"plateau": {"metric": "val_accuracy", "mode": "max"}}),
     "stages[1].until.plateau.metric: task causal_lm does not report val_accuracy (it reports: val_loss, "
     "val_ppl, train_loss)"),
    (_set("stages.1.rules", [{"when": {"target": {"metric": "val_macro_f1", "value": 0.9, "mode": "max"}},
                              "do": "next_stage"}]),
     "stages[1].rules[0].when.target.metric: task causal_lm does not report val_macro_f1"),
]


@pytest.mark.parametrize("mutate,expected", BAD_PLANS, ids=[e for _, e in BAD_PLANS])
def test_bad_plan_one_line_exit_2(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                  mutate: Any, expected: str) -> None:
    plan = _base(corpus)
    mutate(plan)
    path = write_plan(tmp_path, plan)
    code = main(["check", str(path), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}: {expected}")


def test_missing_plan_file_and_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.yaml'}: no such plan file\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n  - a\n")
    assert main(["check", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}: line ")


def test_defaults_merge_into_every_stage_and_stage_wins(tmp_path: Path, corpus: Path) -> None:
    plan = _base(corpus)
    plan["defaults"]["regularization"] = {"grad_clip": 1.0, "l2": 0.01}
    plan["stages"][1]["regularization"] = {"l2": 0.0}
    loaded = load_plan(write_plan(tmp_path, plan))
    assert loaded.stages[0].regularization.grad_clip == 1.0
    assert loaded.stages[0].regularization.l2 == 0.01
    assert loaded.stages[1].regularization.grad_clip == 1.0  # deep merge keeps the default's other keys
    assert loaded.stages[1].regularization.l2 == 0.0
    assert loaded.stages[1].batch.size == 8


def test_overrides_by_stage_name_index_and_top_level(tmp_path: Path, corpus: Path) -> None:
    path = write_plan(tmp_path, _base(corpus))
    loaded = load_plan(path, ["stages.b.steps=80", "stages.0.optimizer.betas=[0.9, 0.95]", "seed=3"])
    assert loaded.stages[1].steps == 80
    assert loaded.stages[0].optimizer.betas == (0.9, 0.95)
    assert loaded.seed == 3
    with pytest.raises(UserError, match=r"^command line: stages.cooldwn.steps=1: no stage 'cooldwn'"):
        load_plan(path, ["stages.cooldwn.steps=1"])
    with pytest.raises(UserError, match=r"^command line: stages.b.steps: input should be greater than or equal to 1"):
        load_plan(path, ["stages.b.steps=0"])


def test_check_prints_stage_tree_and_lr_curve(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the console width
    plan = _base(corpus)
    plan["stages"][0]["schedule"] = {"name": "warmup_constant", "warmup": 10}
    plan["stages"][1].update(optimizer={"handoff": "carry"}, schedule={"name": "decay", "shape": "1-sqrt"}, steps=None,
                             epochs=2)
    del plan["stages"][1]["steps"]
    path = write_plan(tmp_path, plan)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "warmup=10" in out and "decay" in out and "carry" in out
    assert "2 epochs = " in out
    assert "LR over the plan" in out and "█" in out
    assert "plan OK: 2 stages" in out


def test_lr_continues_from_parent_unless_stage_sets_peak(tmp_path: Path, corpus: Path) -> None:
    from stagewise.engine.prepare_run import prepare

    plan = _base(corpus)
    plan["stages"][0]["schedule"] = {"name": "cosine", "min_lr": 1e-4}
    path = write_plan(tmp_path, plan)
    prepared = prepare(load_plan(path), path, tmp_path / "cache")
    a, b = prepared.resolved
    assert b.peak_lr == pytest.approx(1e-4)  # where stage a's cosine ends
    assert b.start_step == a.steps
    changed = copy.deepcopy(plan)
    changed["stages"][1]["optimizer"] = {"lr": 5e-4}
    path2 = write_plan(tmp_path, changed, "plan2.yaml")
    assert prepare(load_plan(path2), path2, tmp_path / "cache").resolved[1].peak_lr == 5e-4
