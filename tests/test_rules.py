"""Evaluation-driven rules, `until`, optimizer hand-off, SWATS, and guards against divergence."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import events as _events
from conftest import metrics as _metrics
from conftest import resumes_identically, tiny_plan, write_plan
from conftest import run_plan as _run
from conftest import stage_weights as _weights
from rich.console import Console

from stagewise.config.rules import PlateauConfig
from stagewise.engine.checkpoint import StageStore, load_checkpoint
from stagewise.engine.control import Plateau
from stagewise.engine.prepare_run import prepare
from stagewise.engine.verify import metrics_difference
from stagewise.errors import RunStopped, UserError
from stagewise.optim.swats import SwatsEstimate, convert_adam_to_sgd
from stagewise.plan.load import load_plan
from stagewise.track.plan_view import print_plan

ADAMW = {"name": "adamw", "lr": 3e-3}


# ---------------------------------------------------------------------------------------- until

def test_plateau_ends_a_stage_early_and_the_next_one_runs(tmp_path: Path, corpus: Path) -> None:
    stages = [
        {"name": "flat", "optimizer": {"name": "adamw", "lr": 1e-7}, "steps": 60, "eval": {"every": 2, "batches": 3},
         "until": {"plateau": {"patience": 1, "min_delta": 0.01}}},
        {"name": "after", "optimizer": {"lr": 3e-3}, "steps": 4},
    ]
    prepared, run = _run(tmp_path, corpus, stages)
    (stopped,) = _events(run, "stage_stopped_early")
    # evals at 2 (best), 4 (1 without improvement), 6 (2 > patience 1): the stage ends at step 6
    assert stopped["stage_step"] == 6 and "plateau of val_loss" in stopped["reason"]
    assert [m["stage_step"] for m in _metrics(run, "eval", "flat")] == [2, 4, 6]  # not evaluated twice at 6
    assert max(m["stage_step"] for m in _metrics(run, "train", "flat")) == 6
    manifest = StageStore(prepared.cache_root, prepared.stages[0].key).final_manifest()
    assert manifest is not None and manifest["step"] == 6 and manifest["summary"]["steps"] == 6
    assert [m["stage_step"] for m in _metrics(run, "train", "after")] == [1, 2, 3, 4]


def test_target_ends_a_stage_when_reached(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "fit", "optimizer": ADAMW, "steps": 200, "eval": {"every": 5, "batches": 3},
               "until": {"target": {"metric": "val_loss", "value": 3.5}}}]
    _, run = _run(tmp_path, corpus, stages)
    evals = _metrics(run, "eval")
    assert evals[-1]["val_loss"] <= 3.5 < min(m["val_loss"] for m in evals[:-1])
    assert _events(run, "stage_stopped_early")[0]["stage_step"] == evals[-1]["stage_step"] < 200


# ---------------------------------------------------------------------------- ReduceLROnPlateau

@pytest.mark.parametrize("values,patience,cooldown", [
    ([3.0, 2.9, 2.95, 2.97, 2.96, 2.99, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0], 1, 0),
    ([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], 2, 1),
    ([5.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0], 0, 2),
])
def test_plateau_counting_is_reduce_lr_on_plateau(values: list[float], patience: int, cooldown: int) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    torch_rule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.5, patience=patience, threshold=0.02, threshold_mode="abs", cooldown=cooldown)
    ours = Plateau(PlateauConfig(patience=patience, min_delta=0.02, cooldown=cooldown))
    lr = 1.0
    for v in values:
        torch_rule.step(v)
        if ours.update(v):
            lr *= 0.5
        assert lr == opt.param_groups[0]["lr"]
    assert lr < 1.0  # the table reduces at least once


def test_on_plateau_lr_scale_follows_reduce_lr_on_plateau_in_training(tmp_path: Path, corpus: Path) -> None:
    rule = {"patience": 1, "min_delta": 0.08, "cooldown": 1, "do": {"lr_scale": {"factor": 0.5, "min_lr": 4e-4}}}
    stages = [{"name": "s", "optimizer": ADAMW, "steps": 50, "eval": {"every": 2, "batches": 3}, "on_plateau": rule}]
    _, run = _run(tmp_path, corpus, stages)
    train_lr = {m["stage_step"]: m["lr"] for m in _metrics(run, "train")}
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=3e-3)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=1, threshold=0.08, threshold_mode="abs", cooldown=1, min_lr=4e-4)
    for m in _metrics(run, "eval")[:-1]:  # the final eval ends the stage: nothing follows it
        reference.step(m["val_loss"])
        assert train_lr[m["stage_step"] + 1] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    fired = _events(run, "rule_fired")
    assert len(fired) >= 2 and all(f["action"] == "lr_scale" and "val_loss" in f["values"] for f in fired)
    assert min(train_lr.values()) == pytest.approx(4e-4)  # reached the floor, and stayed on it


# --------------------------------------------------------------------------- hand-off and SWATS

def test_swats_estimate_matches_the_hand_computed_value() -> None:
    """Two Adam steps on a two-parameter least-squares problem, the SWATS numbers by hand."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    x, y = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([1.0, 0.5])
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    adam = torch.optim.Adam([w], lr=lr, betas=(b1, b2), eps=eps)
    est = SwatsEstimate(beta2=b2)
    m = v = torch.zeros(2, dtype=torch.float64)
    lam, gammas = 0.0, []
    for k in (1, 2):
        adam.zero_grad()
        ((x @ w - y) ** 2).sum().backward()
        g = w.grad.detach().double().clone()
        # by hand: Adam's step p, then gamma = p.p / -p.g and the averaged lambda
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = -lr * (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps)
        gamma = float(p @ p / -(p @ g))
        lam = b2 * lam + (1 - b2) * gamma
        gammas.append(gamma)
        est.before([w])
        adam.step()
        est.after([w])
        assert est.gamma == pytest.approx(gamma, rel=1e-5)
        assert est.corrected == pytest.approx(lam / (1 - b2 ** k), rel=1e-5)
    assert est.corrected != pytest.approx(gammas[-1], rel=1e-3)  # two different gammas: not converged
    assert not est.converged(1e-9, 2) and est.converged(abs(est.corrected - gammas[-1]) * 1.01, 2)


def test_convert_starts_sgd_momentum_from_adams_first_moment() -> None:
    w = torch.nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    adam = torch.optim.Adam([w], lr=0.01, betas=(0.8, 0.99))
    for _ in range(3):
        adam.zero_grad()
        (w ** 3).sum().backward()
        adam.step()
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    assert convert_adam_to_sgd(adam, sgd) == 1
    expected = adam.state[w]["exp_avg"] / (1 - 0.8 ** 3) / (1 - 0.9)
    torch.testing.assert_close(sgd.state[w]["momentum_buffer"], expected)


def test_stage_handoff_convert_and_lr_auto(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "adam", "optimizer": {"name": "adam", "lr": 3e-3}, "steps": 15},
              {"name": "sgd", "optimizer": {"name": "sgd", "lr": "auto", "momentum": 0.9, "handoff": "convert"},
               "steps": 5}]
    prepared, run = _run(tmp_path, corpus, stages)
    (auto,) = _events(run, "lr_auto")
    assert auto["swats_steps"] == 15 and auto["lr"] == pytest.approx(0.1 * auto["swats_estimate"]) and auto["lr"] > 0
    assert _events(run, "optimizer_converted")[0]["converted_parameters"] > 0
    assert _metrics(run, "train", "sgd")[0]["lr"] == pytest.approx(auto["lr"])  # constant schedule from there
    assert prepared.resolved[1].track_swats is False and prepared.resolved[0].track_swats is True


def test_a_stage_after_lr_auto_continues_from_the_swats_lr(tmp_path: Path, corpus: Path) -> None:
    """Adam -> sgd lr auto -> a carried stage with no lr (the translation recipe's shape): the last
    stage continues from the LR SWATS gave, not Adam's; stage_start logs the real LR; `check`
    marks both LRs as known at run time; cut after the SGD stage (the anneal then reads its parent
    back from the store) and mid-anneal, the run ends bit-identical to one never cut."""
    stages = [{"name": "adam", "optimizer": {"name": "adam", "lr": 3e-3}, "steps": 15},
              {"name": "sgd", "optimizer": {"name": "sgd", "lr": "auto", "momentum": 0.9, "handoff": "convert"},
               "steps": 5},
              {"name": "anneal", "optimizer": {"handoff": "carry"}, "schedule": {"name": "cosine"}, "steps": 5},
              {"name": "branch", "from": "sgd@3", "optimizer": {"momentum": 0.5}, "steps": 2}]
    for stop in (20, 22):
        (tmp_path / f"cut{stop}").mkdir()
        run = resumes_identically(tmp_path / f"cut{stop}", corpus, stages, stop_after=stop)
    (auto,) = _events(run, "lr_auto")
    anneal = [m["lr"] for m in _metrics(run, "train", "anneal")]
    assert anneal[0] == pytest.approx(auto["lr"]) and anneal[-1] < anneal[0] / 5  # the cosine from SWATS's LR
    assert [m["lr"] for m in _metrics(run, "train", "branch")] == [pytest.approx(auto["lr"])] * 2
    starts = {e["stage"]: e["settings"]["lr"] for e in _events(run, "stage_start")}
    assert starts["adam"] == 3e-3 and starts["sgd"] == pytest.approx(auto["lr"]) == starts["anneal"]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    console = Console(record=True, width=250)
    print_plan(console, "tiny", prepare(load_plan(path), path, tmp_path / "c").resolved,
               {s["name"]: "train" for s in stages})
    text = console.export_text()
    assert "sgd lr=auto (SWATS)" in text and "sgd lr=sgd's (run time)" in text and "3.00e-03 carry" not in text
    assert "known only at run time, drawn at the LR planned before them: sgd, anneal, branch" in text


def test_swats_switches_once_and_then_stops_reading_the_steps(tmp_path: Path, corpus: Path) -> None:
    """With a test that always holds, the rule fires at min_steps and never again: after the switch
    the steps are SGD's, and SWATS's estimate (and its test) is about Adam's."""
    stages = [{"name": "s", "optimizer": {"name": "adam", "lr": 3e-3}, "steps": 10,
               "rules": [{"when": {"swats": {"tolerance": 1e9, "min_steps": 3}},
                          "do": {"switch": {"to": "sgd", "lr": "auto", "momentum": 0.9}}}]}]
    _, run = _run(tmp_path, corpus, stages)
    (fired,) = _events(run, "rule_fired")
    assert fired["action"] == "switch" and fired["step"] == 3
    assert [m["lr"] for m in _metrics(run, "train", "s") if m["stage_step"] > 3] == [
        pytest.approx(0.1 * fired["values"]["swats_lr"])] * 7


def test_switch_rule_with_swats_and_exact_resume_across_it(tmp_path: Path, corpus: Path) -> None:
    """A plateau scales the LR, then SWATS's test switches Adam to SGD (converted momentum, lr auto);
    a run stopped mid-patience and later after the switch ends bit-identical to one never stopped."""
    stages = [{"name": "s", "optimizer": {"name": "adam", "lr": 3e-3}, "steps": 30, "eval": {"every": 2, "batches": 2},
               "rules": [{"when": {"plateau": {"patience": 1, "min_delta": 0.05}}, "do": {"lr_scale": {"factor": 0.5}},
                          "max_fires": 2},
                         {"when": {"swats": {"tolerance": 0.15, "min_steps": 12}},
                          "do": {"switch": {"to": "sgd", "lr": "auto", "momentum": 0.9, "handoff": "convert"}}}]}]
    top = {"checkpoint": {"every": 3, "keep": 2}}
    _, whole = _run(tmp_path, corpus, stages, "whole", **top)
    fired = _events(whole, "rule_fired")
    switch = [f for f in fired if f["action"] == "switch"]
    assert len(switch) == 1 and switch[0]["optimizer_to"] == "sgd" and switch[0]["converted_parameters"] > 0
    scaled = [f for f in fired if f["action"] == "lr_scale"]
    assert scaled, "the plateau rule must fire for this test to mean anything"
    # Stop one update after an evaluation that left the plateau rule half-way through its patience.
    replay = Plateau(PlateauConfig(patience=1, min_delta=0.05))
    for m in _metrics(whole, "eval"):
        replay.update(m["val_loss"])
        if m["stage_step"] > scaled[0]["stage_step"] and replay.bad == 1:
            break
    stop = m["stage_step"] + 1
    for stop_after in (stop, switch[0]["stage_step"] + 2):
        with pytest.raises(RunStopped):
            _run(tmp_path, corpus, stages, "cut", stop_after=stop_after, **top)
        if stop_after == stop:  # the checkpoint holds the rule mid-window
            path = tmp_path / "cut.yaml"
            cut = prepare(load_plan(path), path, tmp_path / "cut-cache")
            store = StageStore(cut.cache_root, cut.stages[0].key)
            state, _ = load_checkpoint(store.step_dir(stop), store.key, cut.root)
            assert state["control"]["memory"]["plateaus"][0] == replay.state_dict()
    _run(tmp_path, corpus, stages, "cut", **top)
    assert metrics_difference(whole, tmp_path / "cut") is None
    assert [(f["stage_step"], f["values"]) for f in _events(tmp_path / "cut", "rule_fired")] == \
           [(f["stage_step"], f["values"]) for f in fired]
    a, b = _weights(whole, "s"), _weights(tmp_path / "cut", "s")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------- guards

def test_injected_nan_never_reaches_the_weights_and_rollback_completes(tmp_path: Path, corpus: Path) -> None:
    guard = {"action": "rollback", "max_retries": 2}
    clean = [{"name": "s", "optimizer": ADAMW, "steps": 16, "guard": guard}]
    faulty = [{**clean[0], "inject": [{"at": 12, "kind": "nan"}]}]
    top = {"checkpoint": {"every": 5}}
    _, ref = _run(tmp_path, corpus, clean, "clean", **top)
    _, run = _run(tmp_path, corpus, faulty, "faulty", **top)
    (rollback,) = _events(run, "guard_rollback")
    assert rollback["stage_step"] == 13 and rollback["to_stage_step"] == 10 and "non-finite" in rollback["reason"]
    losses = [m["loss"] for m in _metrics(run, "train")]
    assert all(math.isfinite(v) for v in losses)
    # The fault was transient: going back to step 10 replays the clean run exactly.
    a, b = _weights(ref, "s"), _weights(run, "s")
    assert all(torch.equal(a[k], b[k]) for k in a)
    after = [m for m in _metrics(run, "train") if m.get("attempt") == 1]
    assert [m["stage_step"] for m in after] == list(range(11, 17))


def test_skip_drops_the_bad_update(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "s", "optimizer": ADAMW, "steps": 10, "guard": {"action": "skip"},
               "inject": [{"at": 4, "kind": "nan"}]}]
    _, run = _run(tmp_path, corpus, stages)
    (skip,) = _events(run, "guard_skip")
    assert skip["stage_step"] == 5
    assert all(torch.isfinite(t).all() for t in _weights(run, "s").values())
    assert 5 not in [m["stage_step"] for m in _metrics(run, "train")]  # no loss logged for it


def test_a_corrupted_batch_needs_skipped_data(tmp_path: Path, corpus: Path) -> None:
    spike = {"z": 4.0, "window": 8, "warmup": 8}
    base = {"name": "s", "optimizer": ADAMW, "steps": 24, "inject": [{"at": 15, "kind": "corrupt_batch"}]}
    top = {"checkpoint": {"every": 4}}
    stuck = [{**base, "guard": {"spike": spike, "action": "rollback", "max_retries": 2}}]
    with pytest.raises(RunStopped, match=r"update 16: spike: loss .* the guard's 2 retries are spent") as stop:
        _run(tmp_path, corpus, stuck, "stuck", **top)
    assert stop.value.code == 3
    # PaLM's way: back to the checkpoint before the spike, then past the data that caused it (the
    # batches of updates 13-16; skipping fewer only brings the bad batch earlier).
    skipping = [{**base, "guard": {"spike": spike, "action": "rollback", "rollback": {"skip_batches": 4},
                                   "max_retries": 2}}]
    _, run = _run(tmp_path, corpus, skipping, "skipping", **top)
    (rollback,) = _events(run, "guard_rollback")
    assert rollback["stage_step"] == 16 and rollback["to_stage_step"] == 12 and rollback["skip_batches"] == 4
    assert max(m["stage_step"] for m in _metrics(run, "train")) == 24


# ------------------------------------------------------------------------------------ bad plans

@pytest.mark.parametrize("change,message", [
    ({"optimizer": {"name": "sgd", "lr": 0.1, "handoff": "carry"}},
     r"stages\[1\]\.optimizer\.handoff: carry keeps the state of the same optimizer; adamw -> sgd can reset"),
    ({"optimizer": {"name": "sgd", "lr": 0.1, "handoff": "convert"}},
     r"stages\[1\]\.optimizer\.handoff: convert needs sgd momentum > 0"),
    ({"optimizer": {"name": "adam", "lr": 0.1, "handoff": "convert"}},
     r"stages\[1\]\.optimizer\.handoff: convert turns Adam's moment into SGD's momentum: it needs adam/adamw -> sgd"),
    ({"optimizer": {"name": "adam", "lr": "auto"}},
     r"stages\[1\]\.optimizer\.lr: auto \(the SWATS estimate\) is for a switch from adam/adamw to sgd/gd"),
    ({"optimizer": {"name": "sgd", "lr": 0.1}, "rules": [{"when": "swats", "do": {"switch": {"to": "sgd", "lr": 0.01}}}]},
     r"stages\[1\]\.rules\[0\]\.when\.swats: SWATS tests Adam's steps: the stage's optimizer is sgd, not adam/adamw"),
    ({"optimizer": {"name": "sgd", "lr": 0.1},
      "rules": [{"when": {"plateau": {}}, "do": {"switch": {"to": "sgd", "lr": "auto", "momentum": 0.5}}}]},
     r"stages\[1\]\.rules\[0\]\.do\.switch\.lr: auto \(the SWATS estimate\) needs Adam's steps: the stage's "
     r"optimizer is sgd, not adam/adamw"),
    ({"guard": {"rollback": {"skip_batches": 3}}}, r"stages\[1\]\.guard\.rollback: only with action: rollback"),
    ({"guard": {"spike": {"z": 3, "factor": 2}}}, r"stages\[1\]\.guard\.spike\.z: give exactly one of z, factor"),
    ({"rules": [{"when": {"plateau": {}, "target": {"value": 1}}, "do": "next_stage"}]},
     r"stages\[1\]\.rules\[0\]\.when\.plateau: give exactly one of plateau, target, swats \(got plateau, target\)"),
    ({"rules": [{"when": "swats", "do": {"switch": {"to": "sgd", "lr": 0.1}, "next_stage": True}}]},
     r"stages\[1\]\.rules\[0\]\.do\.lr_scale: give exactly one of lr_scale, switch, next_stage, rollback"),
    ({"until": {"platau": {}}}, r"stages\[1\]\.until\.platau: unknown key \(did you mean 'plateau'\?\)"),
    ({"on_plateau": {"metric": "val_acc"}}, r"stages\[1\]\.on_plateau\.metric: "),
])
def test_bad_rules_are_one_line_errors(tmp_path: Path, corpus: Path, change: dict[str, Any], message: str) -> None:
    stages = [{"name": "a", "optimizer": ADAMW, "steps": 4}, {"name": "b", "steps": 4, **change}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    with pytest.raises(UserError, match=message):
        prepare(load_plan(path), path, tmp_path / "cache")
