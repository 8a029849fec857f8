"""What a stage takes from its parent or derives from its own settings: its optimizer and
settings (inherited or that optimizer's defaults) and hand-off, the LR it continues from, the
checkpoints a merge averages, `schedule: plateau` as a rule, the batch ramp."""

from __future__ import annotations

from typing import Any

from stagewise.config.optimizer_config import ADAM, OPTIMIZER_SETTINGS, SCHEDULE_FREE, ScheduleConfig
from stagewise.config.rules import ActionConfig, LrScaleAction, OnPlateauConfig
from stagewise.config.stage_config import MergeConfig, StageConfig
from stagewise.optim.batch_ramp import LR_POWER, BatchRamp, ramp_steps
from stagewise.plan.resolved import ResolvedStage


def stage_ramp(cfg: StageConfig, steps: int) -> BatchRamp:
    """The batch ramp of a `steps`-step stage (its `over` a fraction of them, or a step count)."""
    batch, ramp = cfg.batch, cfg.batch.ramp
    assert ramp is not None
    end = ramp.to // batch.size
    per_level = 1 if ramp.increment is None else ramp.increment // batch.size
    return BatchRamp(size=batch.size, start=batch.accumulate, end=end,
                     steps=max(1, min(steps, ramp_steps(ramp.over, steps))),
                     levels=(end - batch.accumulate) // per_level, lr_power=LR_POWER[ramp.lr_scaling])


def merged_steps(merge: MergeConfig, parent: ResolvedStage, end: int, every: int | None, fail: Any) -> tuple[int, ...]:
    """The parent's steps a merge stage averages: of its checkpoints every `checkpoint.every` steps
    and its end (where the merge branches off), the last K or those in a range."""
    pcfg, name = parent.config, parent.name
    if parent.merged:
        raise fail("merge", f"stage '{name}' is a merge stage: it has no checkpoints of its own")
    if pcfg.adapter is not None:
        raise fail("merge", f"stage '{name}' trains an adapter: a merge averages a stage's whole weights")
    if pcfg.until is not None or any(r.do.next_stage for r in pcfg.all_rules()):
        raise fail("merge", f"stage '{name}' may end early (until, next_stage): a merge picks its checkpoints by step")
    ends_on = ("its best evaluation" if pcfg.end == "best" else "its EMA" if pcfg.average is not None
               else "its averaged weights" if parent.optimizer in SCHEDULE_FREE else None)
    if ends_on is not None:
        raise fail("merge", f"stage '{name}' ends on {ends_on}, not on its last update's weights as its "
                            "checkpoints hold them")
    if every is None:
        raise fail("merge", f"averages checkpoints of stage '{name}': set checkpoint.every (the plan's)")
    saved = [*range(every, end, every), end]
    if merge.last is not None:
        if len(saved) < merge.last:
            fewer = (end - 1) // (merge.last - 1)
            change = (f"set checkpoint.every <= {fewer} or merge.last <= {len(saved)}" if fewer >= 1
                      else f"merge.last <= {len(saved)}")
            raise fail("merge.last", f"stage '{name}' has {len(saved)} checkpoints up to step {end} at "
                                     f"checkpoint.every {every}: {change}")
        return tuple(saved[-merge.last:])
    assert merge.from_ is not None and merge.to is not None  # MergeConfig: last, or a range
    if merge.to > end:
        raise fail("merge.to", f"stage '{name}' ends at step {end} (got {merge.to})")
    picked = tuple(s for s in saved if merge.from_ <= s <= merge.to)
    if len(picked) < 2:
        raise fail("merge.from", f"stage '{name}' has {len(picked)} checkpoint(s) in steps {merge.from_}..{merge.to} "
                                 f"at checkpoint.every {every}: widen the range or lower checkpoint.every")
    return picked


def evaluates_midway(cfg: StageConfig) -> bool:
    return cfg.eval.every is not None or cfg.eval.each_epoch


def plateau_as_rule(cfg: StageConfig, fail: Any) -> StageConfig:
    """`schedule: plateau` is ReduceLROnPlateau: a constant schedule (its warmup kept) and the
    on_plateau rule that scales the LR by `factor` down to `min_lr`; the stage then trains (and is
    keyed) exactly as one written that way."""
    if cfg.on_plateau is not None:
        raise fail("schedule.name", "plateau is an on_plateau lr_scale rule, and the stage has on_plateau already")
    if not evaluates_midway(cfg):
        raise fail("schedule.name", "plateau reacts to evaluations: give eval.every or eval.each_epoch")
    s = cfg.schedule.settings()
    rule = OnPlateauConfig(patience=s["patience"], min_delta=s["threshold"],
                           do=ActionConfig(lr_scale=LrScaleAction(factor=s["factor"], min_lr=s["min_lr"])))
    constant = ScheduleConfig.model_validate({"name": "constant", **({"warmup": cfg.schedule.warmup}
                                                                      if cfg.schedule.warmup is not None else {})})
    return cfg.model_copy(update={"schedule": constant, "on_plateau": rule})


def metrics_used(cfg: StageConfig) -> list[tuple[str, str]]:
    """(key path, metric) of every metric the stage's rules and `until` read."""
    used = []
    if cfg.until is not None:
        used += [(f"until.{k}.metric", c.metric) for k in ("plateau", "target")
                 if (c := getattr(cfg.until, k)) is not None]
    if cfg.on_plateau is not None:
        used.append(("on_plateau.metric", cfg.on_plateau.metric))
    for j, rule in enumerate(cfg.rules):
        used += [(f"rules[{j}].when.{k}.metric", c.metric) for k in ("plateau", "target")
                 if (c := getattr(rule.when, k)) is not None]
    return used


def optimizer_of(cfg: StageConfig, parent: ResolvedStage | None, fail: Any) -> tuple[str, dict[str, Any], str]:
    """The stage's optimizer name, settings and hand-off: the parent's settings when the name is
    unchanged, that optimizer's defaults when it changes; settings the stage gives override either."""
    opt = cfg.optimizer
    # an explicit null is an unset setting (else `lr: null` would pass as an LR of None)
    given = {k: v for k in opt.model_fields_set - {"name", "handoff"} if (v := getattr(opt, k)) is not None}
    if parent is None and opt.name is None:
        raise fail("optimizer.name", "required in the first stage")
    name = opt.name or parent.optimizer  # type: ignore[union-attr]
    same = parent is not None and parent.optimizer == name
    for key in given:
        if key not in OPTIMIZER_SETTINGS[name]:
            raise fail(f"optimizer.{key}", f"not a setting of optimizer '{name}' (inherited from stage "
                                           f"'{parent.name}')")  # type: ignore[union-attr]
    if same:
        base = {k: v for k, v in parent.optimizer_settings.items() if k != "lr"}  # type: ignore[union-attr]
    else:
        base = {k: v for k, v in OPTIMIZER_SETTINGS[name].items() if v is not None}
    settings = {**base, **given}
    if opt.handoff != "reset" and parent is None:
        raise fail("optimizer.handoff", f"{opt.handoff} needs a parent stage (this one starts from the model "
                                        "as built)")
    if opt.handoff != "reset" and parent.merged:  # type: ignore[union-attr]
        raise fail("optimizer.handoff", f"stage '{parent.name}' is a merge: it hands on weights only (use reset)")  # type: ignore[union-attr]
    if opt.handoff != "reset" and (name in SCHEDULE_FREE or parent.optimizer in SCHEDULE_FREE):  # type: ignore[union-attr]
        raise fail("optimizer.handoff", "a schedule-free optimizer hands on its averaged weights only: use reset")
    if opt.handoff == "carry" and not same:
        raise fail("optimizer.handoff", f"carry keeps the state of the same optimizer; {parent.optimizer} -> "  # type: ignore[union-attr]
                                        f"{name} can reset, or convert (adam/adamw -> sgd)")
    if opt.handoff == "convert":
        if parent.optimizer not in ADAM or name != "sgd":  # type: ignore[union-attr]
            raise fail("optimizer.handoff", f"convert turns Adam's moment into SGD's momentum: it needs "
                                            f"adam/adamw -> sgd (got {parent.optimizer} -> {name})")  # type: ignore[union-attr]
        if settings["momentum"] == 0.0:
            raise fail("optimizer.handoff", "convert needs sgd momentum > 0 (the buffer it fills)")
    return name, settings, opt.handoff


def continued_lr(cfg: StageConfig, name: str, parent: ResolvedStage | None, at: int | None, fail: Any) -> float:
    """A stage that sets no LR continues from its parent's LR where it branches off (its end by default)."""
    if parent is None or at is None:
        raise fail("optimizer.lr", "required in the first stage")
    if parent.optimizer != name:
        raise fail("optimizer.lr", f"required when switching from {parent.optimizer} to {name}")
    end = parent.lr(at)
    if end <= 0.0:
        raise fail("optimizer.lr", f"required: stage '{parent.name}' is at lr 0 at step {at}, "
                                   "so there is none to continue from")
    return end
