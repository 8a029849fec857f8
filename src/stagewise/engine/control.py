"""A stage's reactions to what training shows: its rules, `until` conditions, guard and injected
faults, with everything they remember. The loop asks it what to do; actions that touch the model,
optimizer or data (switch, rollback, skip) are carried out by the loop.

What is remembered splits in two. The *memory* (rule counters, LR factor, fires, retries, the best
evaluation, the rollback count) survives a rollback: going back in training does not forget why.
The *trajectory* (the guard's recent losses, the SWATS average, the optimizer in use) belongs to
the weights and goes back with them. Both are saved in checkpoints, so a resumed run decides
exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stagewise.config.rules import PlateauConfig, RuleConfig, SpikeConfig, TargetConfig
from stagewise.engine.distributed import SINGLE, World
from stagewise.optim.swats import SwatsEstimate
from stagewise.plan.resolved import ResolvedStage

ROLLBACK_MAX_FIRES = 3  # a rollback rule without max_fires: going back forever is never wanted


class Plateau:
    """torch's ReduceLROnPlateau counting (threshold_mode 'abs'), for any action."""

    def __init__(self, cfg: PlateauConfig) -> None:
        self.cfg = cfg
        self.best = math.inf if cfg.mode == "min" else -math.inf
        self.bad = 0
        self.cooldown_left = 0

    def update(self, value: float) -> bool:
        """Record one evaluation; True when the plateau condition holds on it."""
        c = self.cfg
        better = value < self.best - c.min_delta if c.mode == "min" else value > self.best + c.min_delta
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad = 0
        if self.bad > c.patience:
            self.cooldown_left, self.bad = c.cooldown, 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad, self.cooldown_left = state["best"], state["bad"], state["cooldown_left"]


def reached(cfg: TargetConfig, metrics: dict[str, float]) -> bool:
    value = metrics[cfg.metric]
    return value <= cfg.value if cfg.mode == "min" else value >= cfg.value


class SpikeHistory:
    """The recent accepted values of the guarded quantity, and the spike test against them."""

    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self.values: deque[float] = deque(maxlen=cfg.window)

    def spike(self, value: float, step: int) -> str | None:
        c = self.cfg
        if step < c.warmup or len(self.values) < 2:
            return None
        mean = statistics.fmean(self.values)
        if c.factor is not None and value > c.factor * mean:
            return f"{c.metric} {value:.4g} > {c.factor:g} x mean {mean:.4g} of the last {len(self.values)}"
        if c.z is not None:
            std = statistics.pstdev(self.values)
            if std > 0 and (value - mean) / std > c.z:
                return f"{c.metric} {value:.4g} is {(value - mean) / std:.1f} sd above mean {mean:.4g}"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque(state["values"], maxlen=self.cfg.window)


@dataclass
class Fired:
    """A rule whose condition held: which one, why, and what it asks for."""

    index: int
    rule: RuleConfig
    values: dict[str, float]


class StageControl:
    def __init__(self, stage: ResolvedStage, track_swats: bool, rank: int = 0) -> None:
        cfg = stage.config
        self.stage, self.rank = stage, rank  # rank: this process's, for faults injected on one rank only
        self.rules = cfg.all_rules()
        self.until = cfg.until
        self.guard = cfg.guard
        self.faults = list(cfg.inject)
        # memory
        self.plateaus = {i: Plateau(r.when.plateau) for i, r in enumerate(self.rules) if r.when.plateau is not None}
        self.until_plateau = Plateau(self.until.plateau) if self.until and self.until.plateau else None
        self.fires = [0] * len(self.rules)
        self.lr_factor = 1.0
        self.best: dict[str, Any] | None = None  # {"value", "metric", "step", "metrics"} of the best evaluation
        self.best_by = self._best_by(stage)
        self.attempt = 0  # rollbacks so far; metrics lines after one say which attempt they belong to
        self.retries = 0  # guard actions so far
        self.fault_attempt: dict[int, int] = {}  # one-time faults: the attempt they happened in
        self.corrupt_at: dict[int, dict[str, int]] = {}  # corrupt_batch: the sampler state it poisons
        self.elapsed = 0.0  # seconds trained in earlier processes (until: time)
        # trajectory
        self.spikes = SpikeHistory(self.guard.spike) if self.guard and self.guard.spike else None
        self.swats = SwatsEstimate(stage.optimizer_settings.get("betas", (0.9, 0.999))[1]) if track_swats else None

    # ------------------------------------------------------------------ what the loop asks

    @property
    def rollback_rules(self) -> bool:
        return any(r.do.rollback is not None for r in self.rules)

    @property
    def checks_updates(self) -> bool:
        return self.guard is not None

    @property
    def rollbacks(self) -> bool:
        """A rule or the guard may go back to a checkpoint (the stage keeps its start and best ones)."""
        return self.rollback_rules or (self.guard is not None and self.guard.action == "rollback")

    def lr(self, step: int) -> float:
        lr = self.stage.lr(step) * self.lr_factor
        for i, f in enumerate(self.faults):
            if f.kind == "lr_burst" and f.at <= step < f.at + f.steps and self._fault_now(i):
                lr *= f.factor
        return lr

    def fault(self, step: int, kind: str) -> float | None:
        """The factor of a one-time fault of `kind` at this update (marking it done on every rank, so
        the state saved is the same), else None; a fault for another rank is None here."""
        for i, f in enumerate(self.faults):
            if f.kind == kind and f.at <= step < f.at + f.steps and self._fault_now(i):
                return f.factor if f.rank in (None, self.rank) else None
        return None

    def corrupts(self, step: int, sampler_state: Callable[[], dict[str, int]]) -> bool:
        """Whether this update's data is the poisoned batch: the one first drawn at update `at`.
        `sampler_state` is asked only when a corrupt_batch fault is planned (not every step)."""
        if not any(f.kind == "corrupt_batch" for f in self.faults):
            return False
        state = sampler_state()
        here = {"epoch": state["epoch"], "position": state["position"]}
        for i, f in enumerate(self.faults):
            if f.kind == "corrupt_batch":
                if i not in self.corrupt_at and step == f.at:
                    self.corrupt_at[i] = here
                if self.corrupt_at.get(i) == here:
                    return True
        return False

    def check_update(self, step: int, loss: float, grad_norm: float) -> str | None:
        """The guard's verdict on an update before it is applied: None, or why not."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        if self.spikes is not None:
            value = loss if self.spikes.cfg.metric == "loss" else grad_norm
            why = self.spikes.spike(value, step)
            if why is not None:
                return f"spike: {why}"
            self.spikes.values.append(value)
        return None

    def after_update(self, follows_adam: bool) -> list[Fired]:
        """After an applied update: the SWATS rules whose test now holds. Only Adam's steps say
        what SGD's LR should be, so the estimate stops (and its rules stop firing) once a rule
        switches away from Adam (`follows_adam`: the optimizer in use is adam/adamw)."""
        fired = []
        swats = self.swats if follows_adam else None
        if swats is not None:
            for i, rule in enumerate(self.rules):
                sw = rule.when.swats
                if sw is not None and self._may_fire(i) and swats.converged(sw.tolerance, sw.min_steps):
                    fired.append(self._fire(i, {"swats_lr": swats.corrected or 0.0, "gamma": swats.gamma or 0.0}))
        return fired

    def time_is_up(self, seconds_this_process: float, world: World = SINGLE) -> bool:
        t = self.until.time if self.until else None
        if t is None:
            return False
        return world.any(self.elapsed + seconds_this_process >= t.minutes * 60)[0]  # each rank has its own clock

    def after_eval(self, step: int, metrics: dict[str, float]) -> tuple[list[Fired], str | None, bool]:
        """Feed one evaluation to the rules and `until`: (rules that fire, why the stage ends or
        None, whether this is the best evaluation so far for rollback rules)."""
        fired = []
        for i, rule in enumerate(self.rules):
            if not self._may_fire(i):
                continue
            when = rule.when
            if when.plateau is not None and self.plateaus[i].update(metrics[when.plateau.metric]):
                fired.append(self._fire(i, {when.plateau.metric: metrics[when.plateau.metric],
                                            "best": self.plateaus[i].best}))
            elif when.target is not None and reached(when.target, metrics):
                fired.append(self._fire(i, {when.target.metric: metrics[when.target.metric]}))
        end = None
        if self.until is not None:
            if self.until_plateau is not None and self.until_plateau.update(metrics[self.until.plateau.metric]):  # type: ignore[union-attr]
                end = f"plateau of {self.until.plateau.metric} (best {self.until_plateau.best:.4g})"  # type: ignore[union-attr]
            elif self.until.target is not None and reached(self.until.target, metrics):
                end = f"target {self.until.target.metric} {metrics[self.until.target.metric]:.4g} reached"
        return fired, end, self.judge_best(step, metrics)

    def judge_best(self, step: int, metrics: dict[str, float]) -> bool:
        """Whether this evaluation is the best so far (then remembered), when something needs the
        best one: a rollback rule goes back to it, `end: best` ends on it."""
        if self.best_by is None:
            return False
        metric, mode = self.best_by
        value = metrics[metric]
        better = self.best is None or (value < self.best["value"] if mode == "min" else value > self.best["value"])
        if better:
            self.best = {"value": value, "metric": metric, "step": step, "metrics": dict(metrics)}
        return better

    def scale_lr(self, step: int, factor: float, min_lr: float = 0.0) -> tuple[float, float] | None:
        """ReduceLROnPlateau's reduction of the current LR; (old, new), or None when below eps."""
        base = self.stage.lr(step)
        old = base * self.lr_factor
        new = max(old * factor, min_lr)
        if old - new <= 1e-8 or base <= 0.0:  # torch's eps: changes smaller than this are ignored
            return None
        self.lr_factor = new / base
        return old, new

    def set_lr(self, step: int, lr: float) -> None:
        """Make the LR at `step` equal `lr`; the schedule's shape goes on from there."""
        base = self.stage.lr(step)
        self.lr_factor = lr / base if base > 0.0 else 1.0

    def _best_by(self, stage: ResolvedStage) -> tuple[str, str] | None:
        """(metric, mode) the best evaluation is judged by: a rollback rule's condition; for `end:
        best` the metric its `until` or a plateau/target rule names, else val_loss; None: unused."""
        rollback = next((r for r in self.rules if r.do.rollback is not None), None)
        if rollback is not None:
            conditions = [rollback.when.plateau or rollback.when.target]
        elif stage.config.end == "best":
            conditions = [self.until.plateau or self.until.target] if self.until else []
            conditions += [r.when.plateau or r.when.target for r in self.rules]
        else:
            return None
        condition = next((c for c in conditions if c is not None), None)
        return (condition.metric, condition.mode) if condition else ("val_loss", "min")

    # ------------------------------------------------------------------ state

    def _may_fire(self, i: int) -> bool:
        rule = self.rules[i]
        limit = rule.max_fires or (ROLLBACK_MAX_FIRES if rule.do.rollback is not None else None)
        return limit is None or self.fires[i] < limit

    def _fire(self, i: int, values: dict[str, float]) -> Fired:
        self.fires[i] += 1
        return Fired(i, self.rules[i], values)

    def _fault_now(self, i: int) -> bool:
        done = self.fault_attempt.setdefault(i, self.attempt)
        return done == self.attempt

    def memory(self) -> dict[str, Any]:
        return {"plateaus": {i: p.state_dict() for i, p in self.plateaus.items()},
                "until_plateau": self.until_plateau.state_dict() if self.until_plateau else None,
                "fires": list(self.fires), "lr_factor": self.lr_factor, "best": self.best,
                "attempt": self.attempt, "retries": self.retries, "fault_attempt": dict(self.fault_attempt),
                "corrupt_at": dict(self.corrupt_at), "elapsed": self.elapsed}

    def state_dict(self, seconds_this_process: float) -> dict[str, Any]:
        """The rest of the trajectory (optimizer spec, SWATS) goes in the checkpoint's hand-off
        part, which a child stage reads too (StageTrainer.handoff_state)."""
        return {"memory": {**self.memory(), "elapsed": self.elapsed + seconds_this_process},
                "spikes": self.spikes.state_dict() if self.spikes else None}

    def load_state_dict(self, state: dict[str, Any], handoff: dict[str, Any], keep_memory: bool = False) -> None:
        """Restore a checkpoint's state; `keep_memory`: a rollback, which keeps what was learnt."""
        if not keep_memory:
            m = state["memory"]
            for i, p in self.plateaus.items():
                p.load_state_dict(m["plateaus"][i])
            if self.until_plateau is not None:
                self.until_plateau.load_state_dict(m["until_plateau"])
            self.fires, self.lr_factor, self.best = list(m["fires"]), m["lr_factor"], m["best"]
            self.attempt, self.retries, self.elapsed = m["attempt"], m["retries"], m["elapsed"]
            self.fault_attempt, self.corrupt_at = dict(m["fault_attempt"]), dict(m["corrupt_at"])
        if self.spikes is not None and state["spikes"] is not None:
            self.spikes.load_state_dict(state["spikes"])
        if self.swats is not None and handoff["swats"] is not None:
            self.swats.load_state_dict(handoff["swats"])

