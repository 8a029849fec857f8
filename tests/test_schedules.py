"""Schedules: closed forms by hand, and step-by-step agreement with torch's own schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler

from stagewise.config.optimizer_config import ScheduleConfig
from stagewise.optim.schedules import lr_at, resolve_duration, schedule_problems


def cfg(**kwargs: object) -> ScheduleConfig:
    return ScheduleConfig(**kwargs)


def warm(step: int, w: int, peak: float) -> float:
    return peak * (step + 1) / (w + 1)


def cos_between(lo: float, hi: float, p: float) -> float:
    return lo + (hi - lo) * (1 + math.cos(math.pi * p)) / 2


PEAK, MIN = 3e-4, 1e-5

# (schedule config, step, total, peak, expected from the closed form)
CASES = {
    "constant": [
        (dict(name="constant"), 0, 100, PEAK, PEAK),
        (dict(name="constant"), 100, 100, PEAK, PEAK),
        (dict(name="constant", warmup=10), 0, 100, PEAK, warm(0, 10, PEAK)),
        (dict(name="constant", warmup=10), 4, 100, PEAK, warm(4, 10, PEAK)),
        (dict(name="constant", warmup=0.1), 10, 100, PEAK, PEAK),
        (dict(name="warmup_constant", warmup=0.25), 3, 40, PEAK, warm(3, 10, PEAK)),
    ],
    "step": [
        (dict(name="step", step_size=30, gamma=0.5), 29, 100, PEAK, PEAK),
        (dict(name="step", step_size=30, gamma=0.5), 65, 100, PEAK, PEAK * 0.5 ** 2),
        (dict(name="step", step_size=0.25), 50, 100, PEAK, PEAK * 0.1 ** 2),
        (dict(name="step", step_size=0.25), 100, 100, PEAK, PEAK * 0.1 ** 4),
        (dict(name="step", step_size=30, warmup=10), 5, 100, PEAK, warm(5, 10, PEAK)),
        (dict(name="step", step_size=30, warmup=10), 35, 100, PEAK, PEAK * 0.1),  # from stage start
    ],
    "multistep": [
        # DeepSeek LLM's plan: 80% and 90% of the run, x0.316 each.
        (dict(name="multistep", milestones=[0.8, 0.9], gamma=0.316, warmup=20), 10, 1000, PEAK, warm(10, 20, PEAK)),
        (dict(name="multistep", milestones=[0.8, 0.9], gamma=0.316, warmup=20), 799, 1000, PEAK, PEAK),
        (dict(name="multistep", milestones=[0.8, 0.9], gamma=0.316, warmup=20), 800, 1000, PEAK, PEAK * 0.316),
        (dict(name="multistep", milestones=[0.8, 0.9], gamma=0.316, warmup=20), 950, 1000, PEAK, PEAK * 0.316 ** 2),
        (dict(name="multistep", milestones=[0.8, 0.9], gamma=0.316, warmup=20), 1000, 1000, PEAK, PEAK * 0.316 ** 2),
        (dict(name="multistep", milestones=[25, 0.5]), 60, 100, PEAK, PEAK * 0.1 ** 2),
    ],
    "exponential": [
        (dict(name="exponential", gamma=0.99), 37, 100, PEAK, PEAK * 0.99 ** 37),
        (dict(name="exponential", gamma=0.99, warmup=10), 60, 100, PEAK, PEAK * 0.99 ** 50),
        (dict(name="exponential", gamma=0.99, warmup=10), 100, 100, PEAK, PEAK * 0.99 ** 90),
    ],
    "cosine": [
        (dict(name="cosine"), 25, 100, PEAK, cos_between(0.0, PEAK, 25 / 100)),
        (dict(name="cosine", min_lr=MIN, warmup=10), 10, 100, PEAK, PEAK),
        (dict(name="cosine", min_lr=MIN, warmup=10), 55, 100, PEAK, cos_between(MIN, PEAK, 45 / 90)),
        (dict(name="cosine", min_lr=MIN, warmup=10), 100, 100, PEAK, MIN),
    ],
    "decay": [
        (dict(name="decay"), 25, 100, PEAK, PEAK * (1 - 0.25)),
        (dict(name="decay", shape="cosine", min_lr=MIN, warmup=20), 40, 100, PEAK, cos_between(MIN, PEAK, 20 / 80)),
        (dict(name="decay", shape="1-sqrt", min_lr=MIN), 49, 100, PEAK, MIN + (PEAK - MIN) * (1 - math.sqrt(0.49))),
        (dict(name="decay", shape="1-sqrt", min_lr=MIN), 100, 100, PEAK, MIN),
    ],
    "wsd": [
        (dict(name="wsd", warmup=10), 5, 100, PEAK, warm(5, 10, PEAK)),
        (dict(name="wsd", warmup=10), 80, 100, PEAK, PEAK),  # last 20% decays: 80..100
        (dict(name="wsd", warmup=10, min_lr=MIN), 90, 100, PEAK, MIN + (PEAK - MIN) * (1 - math.sqrt(0.5))),
        (dict(name="wsd", warmup=10, min_lr=MIN), 100, 100, PEAK, MIN),
        (dict(name="wsd", decay=40, shape="linear"), 70, 100, PEAK, PEAK * (1 - 10 / 40)),
        (dict(name="wsd", decay=1.0, shape="cosine"), 30, 100, PEAK, cos_between(0.0, PEAK, 0.3)),
    ],
    "onecycle": [
        # Phase 1 ends at pct_start * total - 1 = 29: initial = peak/25 -> peak, then -> initial/1e4.
        (dict(name="onecycle"), 0, 100, PEAK, PEAK / 25),
        (dict(name="onecycle"), 29, 100, PEAK, PEAK),
        (dict(name="onecycle", anneal="linear"), 10, 100, PEAK, PEAK / 25 + (PEAK - PEAK / 25) * 10 / 29),
        (dict(name="onecycle"), 99, 100, PEAK, PEAK / 25 / 1e4),
        (dict(name="onecycle", div_factor=10.0, final_div_factor=100.0), 100, 100, PEAK, PEAK / 10 / 100),
    ],
    # Its reductions come from evaluations (an on_plateau rule, tests/test_stage_features.py).
    "plateau": [
        (dict(name="plateau", factor=0.5), 60, 100, PEAK, PEAK),
        (dict(name="plateau", warmup=10), 4, 100, PEAK, warm(4, 10, PEAK)),
    ],
    "stlr": [
        (dict(name="stlr"), 0, 100, PEAK, PEAK / 32),
        (dict(name="stlr"), 5, 100, PEAK, PEAK * (1 + 0.5 * 31) / 32),
        (dict(name="stlr"), 10, 100, PEAK, PEAK),
        (dict(name="stlr"), 55, 100, PEAK, PEAK * (1 + 0.5 * 31) / 32),
        (dict(name="stlr"), 100, 100, PEAK, PEAK / 32),
        # cut = 90 * 0.2 = 18; p = 1 - (37 - 18) / (18 * (1 / 0.2 - 1)) = 1 - 19 / 72 = 53 / 72;
        # lr = peak * (1 + 53 / 72 * 7) / 8 = peak * 443 / 576.
        (dict(name="stlr", cut_frac=0.2, ratio=8.0), 37, 90, PEAK, PEAK * 443 / 576),
        # cut = floor(1.5) = 1: the paper's p would go below 0 (the LR negative); it holds at peak/ratio.
        (dict(name="stlr"), 15, 15, PEAK, PEAK / 32),
    ],
}


@pytest.mark.parametrize(
    ("config", "step", "total", "peak", "expected"),
    [case for cases in CASES.values() for case in cases],
    ids=[f"{name}-{i}" for name, cases in CASES.items() for i in range(len(cases))],
)
def test_closed_form(config: dict, step: int, total: int, peak: float, expected: float) -> None:
    assert lr_at(cfg(**config), step, total, peak) == pytest.approx(expected, rel=1e-12)


def test_every_schedule_has_a_table() -> None:
    from stagewise.config.registry import SCHEDULES

    assert set(CASES) == set(SCHEDULES)


def _torch_lrs(make: object, total: int, peak: float) -> list[float]:
    """The LR a real torch optimizer uses at each step 0..total-1, driven by `make(optimizer)`."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = make(optimizer)  # type: ignore[operator]
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
    return lrs


TOTAL = 120
AGAINST_TORCH = [
    (dict(name="step", step_size=25, gamma=0.5), lambda o: lr_scheduler.StepLR(o, step_size=25, gamma=0.5)),
    (dict(name="multistep", milestones=[0.5, 90], gamma=0.316),
     lambda o: lr_scheduler.MultiStepLR(o, milestones=[60, 90], gamma=0.316)),
    (dict(name="exponential", gamma=0.97), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.97)),
    (dict(name="cosine", min_lr=MIN), lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL, eta_min=MIN)),
    (dict(name="cosine", min_lr=MIN, warmup=20), lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=1 / 21, total_iters=20),
            lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL - 20, eta_min=MIN)], milestones=[20])),
    (dict(name="constant", warmup=30), lambda o: lr_scheduler.LinearLR(o, start_factor=1 / 31, total_iters=30)),
    (dict(name="onecycle"), lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=PEAK, total_steps=TOTAL, cycle_momentum=False)),
    (dict(name="onecycle", pct_start=0.25, div_factor=10.0, final_div_factor=50.0, anneal="linear"),
     lambda o: lr_scheduler.OneCycleLR(o, max_lr=PEAK, total_steps=TOTAL, pct_start=0.25, div_factor=10.0,
                                       final_div_factor=50.0, anneal_strategy="linear", cycle_momentum=False)),
]


@pytest.mark.parametrize(("config", "make"), AGAINST_TORCH, ids=[c["name"] for c, _ in AGAINST_TORCH])
def test_matches_torch_over_a_whole_stage(config: dict, make: object) -> None:
    schedule = cfg(**config)
    ours = [lr_at(schedule, step, TOTAL, PEAK) for step in range(TOTAL)]
    assert ours == pytest.approx(_torch_lrs(make, TOTAL, PEAK), rel=1e-9, abs=1e-15)


def test_onecycle_is_torch_exactly() -> None:
    # Same arithmetic, not just the same curve: the values are equal to the last bit.
    ours = [lr_at(cfg(name="onecycle"), step, TOTAL, PEAK) for step in range(TOTAL)]
    theirs = _torch_lrs(lambda o: lr_scheduler.OneCycleLR(o, max_lr=PEAK, total_steps=TOTAL, cycle_momentum=False),
                        TOTAL, PEAK)
    assert ours == theirs


@pytest.mark.parametrize(("total", "cut_frac", "ratio"), [(120, 0.1, 32.0), (90, 0.2, 8.0), (40, 0.25, 10.0)])
def test_stlr_is_torch_onecycle_with_linear_phases(total: int, cut_frac: float, ratio: float) -> None:
    """Where total * cut_frac is whole, ULMFiT's slanted triangle is OneCycleLR's two linear
    phases: from peak / ratio up to peak at step cut, down to peak / ratio at the stage's end
    (step total, hence torch's total_steps = total + 1)."""
    cut = round(total * cut_frac)
    ours = [lr_at(cfg(name="stlr", cut_frac=cut_frac, ratio=ratio), step, total, PEAK) for step in range(total + 1)]
    theirs = _torch_lrs(lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=PEAK, total_steps=total + 1, pct_start=(cut + 1) / (total + 1), div_factor=ratio,
        final_div_factor=1.0, anneal_strategy="linear", cycle_momentum=False), total + 1, PEAK)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert max(ours) == ours[cut] == pytest.approx(PEAK) and ours[0] == ours[total] == pytest.approx(PEAK / ratio)


@pytest.mark.parametrize("name", ["constant", "cosine", "decay", "wsd", "exponential"])
@pytest.mark.parametrize("warmup", [1, 7, 0.25])
def test_warmup_rises_to_peak_at_w(name: str, warmup: int | float) -> None:
    extra = {"gamma": 0.9} if name == "exponential" else {}
    schedule = cfg(name=name, warmup=warmup, **extra)
    total = 40
    w = resolve_duration(warmup, total)
    lrs = [lr_at(schedule, step, total, PEAK) for step in range(w + 1)]
    assert lrs[0] > 0
    assert all(a < b for a, b in zip(lrs, lrs[1:]))
    assert lrs[w] == PEAK


@pytest.mark.parametrize("config", [dict(name="wsd"), dict(name="wsd", warmup=5, decay=7, shape="linear"),
                                    dict(name="wsd", shape="cosine", decay=0.5)])
def test_wsd_ends_on_min_lr(config: dict) -> None:
    assert lr_at(cfg(**config, min_lr=MIN), 50, 50, PEAK) == MIN


def test_resolve_duration() -> None:
    assert resolve_duration(7, 100) == 7
    assert resolve_duration(0.25, 100) == 25
    assert resolve_duration(1.0, 37) == 37
    assert resolve_duration(0.5, 3) == 2  # 1.5 steps round to 2
    with pytest.raises(ValueError):
        resolve_duration(1.5, 100)


def test_warmup_problem_message() -> None:
    assert schedule_problems(cfg(name="cosine", warmup=500), 400) == [("warmup", "must be < steps (got 500 >= 400)")]
    assert schedule_problems(cfg(name="cosine", warmup=400), 400) == [("warmup", "must be < steps (got 400 >= 400)")]
    assert schedule_problems(cfg(name="cosine", warmup=399), 400) == []


@pytest.mark.parametrize(("config", "total", "key"), [
    (dict(name="step", step_size=200), 100, "step_size"),
    (dict(name="step", step_size=10, warmup=10), 100, "step_size"),  # first cut inside the warmup
    (dict(name="multistep", milestones=[50, 150]), 100, "milestones"),
    (dict(name="multistep", milestones=[0.05, 0.5], warmup=10), 100, "milestones"),
    (dict(name="multistep", milestones=[0]), 100, "milestones"),
    (dict(name="wsd", warmup=60, decay=50), 100, "decay"),
    (dict(name="wsd", decay=0.2), 2, "decay"),  # rounds to 0 steps
    (dict(name="onecycle"), 3, "pct_start"),
    (dict(name="stlr"), 9, "cut_frac"),
])
def test_problems(config: dict, total: int, key: str) -> None:
    problems = schedule_problems(cfg(**config), total)
    assert [k for k, _ in problems] == [key]
    with pytest.raises(ValueError, match=key):
        lr_at(cfg(**config), 0, total, PEAK)


@pytest.mark.parametrize("config", [cfg(name=n, **extra) for n, extra in [
    ("constant", {}), ("step", {"step_size": 1}), ("multistep", {"milestones": [1]}),
    ("exponential", {"gamma": 0.5}), ("cosine", {}), ("decay", {}), ("wsd", {"decay": 1}),
    ("onecycle", {"pct_start": 0.6}), ("stlr", {"cut_frac": 0.5})]])
def test_two_step_stages_are_defined_everywhere(config: ScheduleConfig) -> None:
    assert schedule_problems(config, 2) == []
    lrs = [lr_at(config, step, 2, PEAK) for step in range(3)]
    assert all(math.isfinite(lr) and 0 <= lr <= PEAK for lr in lrs)


def test_step_out_of_range() -> None:
    with pytest.raises(ValueError):
        lr_at(cfg(), 11, 10, PEAK)
