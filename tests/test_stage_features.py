"""Issue 18's stage features: best weights, the plateau schedule, weight averaging, the gentler
spike action, schedule-free optimizers, batch ramps, data mixtures and merge stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import events as _events
from conftest import metrics as _metrics
from conftest import run_plan as _run
from conftest import stage_weights as _weights
from conftest import tiny_plan, write_plan
from safetensors.torch import load_file

from stagewise.engine.checkpoint import StageStore
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.verify import metrics_difference
from stagewise.errors import RunStopped, UserError
from stagewise.optim.optimizers import build_optimizer
from stagewise.plan.load import load_plan

ADAMW = {"name": "adamw", "lr": 3e-3}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tensor(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A parameter from a checkpoint's file, where GPT-2's tied embedding is saved as lm_head.weight."""
    return weights[name] if name in weights else weights["lm_head.weight"]


def _bad_plan(tmp: Path, corpus: Path, change: dict[str, Any], message: str) -> None:
    stages = [{"name": "a", "optimizer": ADAMW, "steps": 4}, {"name": "b", "steps": 4, **change}]
    path = write_plan(tmp, tiny_plan(corpus, stages))
    with pytest.raises(UserError, match=message):
        prepare(load_plan(path), path, tmp / "cache")


# ------------------------------------------------------------------------------------ end: best

def test_end_best_hands_on_the_best_steps_weights(tmp_path: Path, corpus: Path) -> None:
    # An LR burst late in the stage makes the last evaluations worse than an earlier one.
    best_stage = {"name": "s", "optimizer": ADAMW, "steps": 30, "eval": {"every": 5, "batches": 3}, "end": "best",
                  "inject": [{"kind": "lr_burst", "at": 21, "factor": 40.0, "steps": 6}]}
    child = {"name": "c", "optimizer": {"name": "sgd", "lr": 0.01}, "steps": 3}
    prepared, run = _run(tmp_path, corpus, [best_stage, child], checkpoint={"every": 5, "keep": 10})
    evals = {m["stage_step"]: m["val_loss"] for m in _metrics(run, "eval", "s")}
    best = min(evals, key=evals.__getitem__)
    assert best < 30 and evals[best] < evals[30]  # the burst did its job: the last weights are not the best
    (ended,) = _events(run, "stage_end_best")
    assert ended["stage_step"] == best and ended["value"] == evals[best] and ended["metric"] == "val_loss"
    store = StageStore(prepared.cache_root, prepared.stages[0].key)
    at_best = load_file(store.step_dir(best) / "model.safetensors")
    assert _same(load_file(store.final_dir / "model.safetensors"), at_best)  # the cache's final = the best step's
    exported = _weights(run, "s")  # and so is the export (the tied embedding is saved once, under either name)
    assert exported and all(torch.equal(v, _tensor(at_best, k)) for k, v in exported.items())
    assert store.final_manifest()["summary"]["val_loss"] == evals[best]  # type: ignore[index]
    # The child trains from the best weights: as a branch from that step does.
    last = {**best_stage, "end": "last"}
    _, branch_run = _run(tmp_path, corpus, [last, {**child, "from": f"s@{best}"}], tag="branch",
                         checkpoint={"every": 5, "keep": 10})
    losses = [m["loss"] for m in _metrics(run, "train", "c")]
    assert losses == [m["loss"] for m in _metrics(branch_run, "train", "c")] and len(losses) == 3


def test_end_best_needs_evaluations_during_the_stage(tmp_path: Path, corpus: Path) -> None:
    _bad_plan(tmp_path, corpus, {"end": "best"}, r"stages\[1\]\.end: best needs evaluations during the stage")


# ------------------------------------------------------------------------------ plateau schedule

def test_plateau_schedule_is_the_on_plateau_rule_bit_for_bit(tmp_path: Path, corpus: Path) -> None:
    base = {"name": "s", "optimizer": ADAMW, "steps": 24, "eval": {"every": 2, "batches": 3}}
    schedule = {"name": "plateau", "warmup": 2, "factor": 0.5, "patience": 0, "threshold": 0.05, "min_lr": 1e-3}
    rule = {"patience": 0, "min_delta": 0.05, "do": {"lr_scale": {"factor": 0.5, "min_lr": 1e-3}}}
    a, run_a = _run(tmp_path, corpus, [{**base, "schedule": schedule}], tag="schedule")
    b, run_b = _run(tmp_path, corpus, [{**base, "schedule": {"name": "constant", "warmup": 2}, "on_plateau": rule}],
                    tag="rule")
    assert a.stages[0].key == b.stages[0].key  # the same stage, so one cache entry serves both
    lines = [{k: v for k, v in m.items() if k != "tok_per_s"} for m in read_jsonl(run_a / "metrics.jsonl")]
    assert lines == [{k: v for k, v in m.items() if k != "tok_per_s"} for m in read_jsonl(run_b / "metrics.jsonl")]
    assert _same(_weights(run_a, "s"), _weights(run_b, "s"))
    assert len({m["lr"] for m in _metrics(run_a, "train")}) > 3  # warmup, peak and at least one reduction


@pytest.mark.parametrize("change,message", [
    ({"schedule": {"name": "plateau"}}, r"stages\[1\]\.schedule\.name: plateau reacts to evaluations"),
    ({"schedule": {"name": "plateau"}, "eval": {"every": 2}, "on_plateau": {}},
     r"stages\[1\]\.schedule\.name: plateau is an on_plateau lr_scale rule"),
    ({"schedule": {"name": "cosine", "factor": 0.5}}, r"stages\[1\]\.schedule\.factor: not a setting of schedule"),
])
def test_bad_plateau_schedules_are_one_line_errors(tmp_path: Path, corpus: Path, change: dict[str, Any],
                                                   message: str) -> None:
    _bad_plan(tmp_path, corpus, change, message)


# -------------------------------------------------------------------------------------------- EMA

def test_ema_follows_the_hand_computation_and_the_stage_ends_on_it(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": ADAMW, "steps": 2},
              {"name": "e", "optimizer": {"lr": 1e-2}, "steps": 4, "average": {"ema": 0.9}}]
    prepared, run = _run(tmp_path, corpus, stages, checkpoint={"every": 1, "keep": 10})
    names = [n for n, _ in prepared.root.named_parameters()]
    start = load_file(StageStore(prepared.cache_root, prepared.stages[0].key).final_dir / "model.safetensors")
    store = StageStore(prepared.cache_root, prepared.stages[1].key)
    ema = {n: _tensor(start, n).clone() for n in names}
    for step in range(1, 5):
        live = load_file(store.step_dir(step) / "model.safetensors")
        ema = {n: ema[n] + (1 - 0.9) * (_tensor(live, n) - ema[n]) for n in names}
        state = torch.load(store.step_dir(step) / "state.pt", weights_only=True)
        for n, saved in zip(names, state["average"]["shadow"], strict=True):
            assert torch.allclose(saved, ema[n], rtol=1e-6, atol=1e-8), (step, n)
    final = load_file(store.final_dir / "model.safetensors")
    assert all(torch.allclose(_tensor(final, n), ema[n], rtol=1e-6, atol=1e-8) for n in names)  # ends on it
    assert not all(torch.equal(_tensor(final, n), _tensor(live, n)) for n in names)  # not the live weights


def test_ema_resumes_bit_identically(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "e", "optimizer": ADAMW, "steps": 12, "eval": {"every": 4, "batches": 2},
               "average": {"ema": 0.8}}]
    top = {"checkpoint": {"every": 3, "keep": 2}}
    _, whole = _run(tmp_path, corpus, stages, "whole", **top)
    with pytest.raises(RunStopped):
        _run(tmp_path, corpus, stages, "cut", stop_after=7, **top)
    _run(tmp_path, corpus, stages, "cut", **top)
    assert metrics_difference(whole, tmp_path / "cut") is None
    assert _same(_weights(whole, "e"), _weights(tmp_path / "cut", "e"))


# --------------------------------------------------------------------------------- reset_moments

def test_reset_moments_restarts_adam_and_training_goes_on(tmp_path: Path, corpus: Path) -> None:
    guard = {"spike": {"factor": 3.0, "window": 5, "warmup": 3}, "action": "reset_moments", "reset": {"clip": 0.5}}
    stages = [{"name": "s", "optimizer": ADAMW, "steps": 12, "guard": guard,
               "inject": [{"kind": "loss_spike", "at": 8, "factor": 10.0}]}]
    prepared, run = _run(tmp_path, corpus, stages, checkpoint={"every": 1, "keep": 20})
    (reset,) = _events(run, "guard_reset_moments")
    assert reset["stage_step"] == 9 and reset["clip"] == 0.5 and reset["reset_parameters"] > 0
    assert "spike" in reset["reason"] and not _events(run, "guard_skip")
    store = StageStore(prepared.cache_root, prepared.stages[0].key)

    def adam_steps(step: int) -> set[float]:
        state = torch.load(store.step_dir(step) / "state.pt", weights_only=True)["optimizer"]["state"]
        assert len(state) == reset["reset_parameters"]
        return {float(s["step"]) for s in state.values()}

    assert adam_steps(8) == {8.0}  # before the spike: eight updates in the moments
    assert adam_steps(9) == {1.0}  # the spiking update was applied on fresh moments
    assert adam_steps(12) == {4.0}  # and training went on from there
    assert [m["stage_step"] for m in _metrics(run, "train")] == list(range(1, 13))
    assert _metrics(run, "train")[8]["grad_norm"] > 0.5  # the spiking gradient, before its clip


def test_reset_settings_need_the_reset_action(tmp_path: Path, corpus: Path) -> None:
    _bad_plan(tmp_path, corpus, {"guard": {"reset": {"clip": 1.0}}},
              r"stages\[1\]\.guard\.reset: only with action: reset_moments")


# ---------------------------------------------------------------------------------- schedule-free

def test_schedule_free_evaluates_and_ends_on_its_averaged_weights(tmp_path: Path, corpus: Path) -> None:
    pytest.importorskip("schedulefree")
    stages = [{"name": "sf", "optimizer": {"name": "schedulefree_adamw", "lr": 3e-3, "betas": [0.8, 0.99]},
               "steps": 6, "eval": {"every": 3, "batches": 2}}]
    prepared, run = _run(tmp_path, corpus, stages, checkpoint={"every": 3, "keep": 5})
    names = [n for n, _ in prepared.root.named_parameters()]
    store = StageStore(prepared.cache_root, prepared.stages[0].key)
    # The last mid-stage checkpoint holds the training point y (step 6 is also the last update),
    # its state z; the optimizer's eval() puts x = y + (1 - 1/beta1) (z - y) into the parameters.
    y = load_file(store.step_dir(6) / "model.safetensors")
    state = torch.load(store.step_dir(6) / "state.pt", weights_only=True)["optimizer"]
    assert all(g["train_mode"] for g in state["param_groups"])  # saved while training: exact resume
    optimizer = build_optimizer("schedulefree_adamw", prepared.stages[0].resolved.optimizer_settings, prepared.root)
    order = {id(p): n for n, p in prepared.root.named_parameters()}  # the state's indices: the groups' order
    in_groups = [order[id(p)] for g in optimizer.param_groups for p in g["params"]]
    z = {in_groups[i]: s["z"] for i, s in state["state"].items()}
    final = load_file(store.final_dir / "model.safetensors")
    for n in names:
        x = torch.lerp(_tensor(y, n), z[n], 1 - 1 / 0.8)
        assert torch.equal(_tensor(final, n), x), n
    assert not all(torch.equal(_tensor(final, n), _tensor(y, n)) for n in names)
    # Evaluating at step 3 swapped x in and y back exactly: the same run stopped there and resumed
    # ends bit-identical.
    with pytest.raises(RunStopped):
        _run(tmp_path, corpus, stages, "cut", stop_after=4, checkpoint={"every": 3, "keep": 5})
    _run(tmp_path, corpus, stages, "cut", checkpoint={"every": 3, "keep": 5})
    assert metrics_difference(run, tmp_path / "cut") is None
    assert _same(_weights(run, "sf"), _weights(tmp_path / "cut", "sf"))


def test_schedule_free_hands_on_weights_only(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": {"name": "schedulefree_adamw", "lr": 3e-3}, "steps": 4},
              {"name": "b", "optimizer": {"handoff": "carry"}, "steps": 4}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    with pytest.raises(UserError, match=r"stages\[1\]\.optimizer\.handoff: a schedule-free optimizer hands on"):
        prepare(load_plan(path), path, tmp_path / "cache")
