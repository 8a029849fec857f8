"""Validated plan + data sizes -> the concrete stages the engine runs.

Everything that depends on the data (steps of an `epochs`/`tokens` stage, block size against the
model's context) or on the parent stage (inherited optimizer settings, the LR a stage continues
from) is settled here, before anything trains, and reported as one line naming the key path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from stagewise.config.optimizer_config import ADAM, SCHEDULE_FREE
from stagewise.config.stage_config import StageConfig
from stagewise.errors import UserError
from stagewise.optim.batch_ramp import fewest_steps, ramp_steps
from stagewise.optim.schedules import schedule_problems
from stagewise.plan.resolved import ResolvedStage, StageData
from stagewise.plan.stage_keys import stage_key
from stagewise.plan.stage_settings import (
    continued_lr,
    evaluates_midway,
    merged_steps,
    metrics_used,
    optimizer_of,
    plateau_as_rule,
    stage_ramp,
)
from stagewise.plan.tree import StageNode
from stagewise.tasks.spec import task_spec


def resolve_stages(nodes: list[StageNode], data: list[StageData], context_length: int | None,
                   identity: dict[str, Any], where: str, checkpoint_every: int | None = None) -> list[ResolvedStage]:
    """`data`: each stage's; `context_length`: the causal LM's, if any; `identity`: what besides
    the stages decides the weights (model, tokenizer, data, seed, ...); `checkpoint_every`: the
    plan's, which sets the checkpoints a merge stage picks from."""
    stages: list[ResolvedStage] = []
    swats = _swats_needed(nodes)
    for node in nodes:
        stages.append(_resolve_one(node, stages, data[node.index], context_length, identity, where, swats,
                                   checkpoint_every))
    return stages


def _swats_needed(nodes: list[StageNode]) -> set[str]:
    """Stages that must keep the SWATS estimate: for their own rules, or a child's `lr: auto`."""
    needed = set()
    for node in nodes:
        cfg = node.config
        if any(r.when.swats is not None or (r.do.switch is not None and r.do.switch.lr == "auto")
               for r in cfg.all_rules()):
            needed.add(cfg.name)
        if cfg.optimizer.lr == "auto" and node.parent is not None:
            needed.add(node.parent.name)
    return needed


def pinned_steps(stages: list[ResolvedStage]) -> dict[str, set[int]]:
    """Steps of each stage that a branch starts from (`from: NAME@STEP`) or a merge averages (but
    its end, the final checkpoint): saved and never pruned."""
    pins: dict[str, set[int]] = {s.name: set() for s in stages}
    by_name = {s.name: s for s in stages}
    for s in stages:
        if s.parent is not None and s.parent_step is not None:
            pins[s.parent].add(s.parent_step)
        if s.parent is not None and s.merged:
            pins[s.parent] |= set(s.merged) - {by_name[s.parent].steps}
    return pins


def _parent(node: StageNode, earlier: list[ResolvedStage], fail: Any) -> tuple[ResolvedStage | None, int | None]:
    """The parent's resolved stage, and the step this stage branches from (None: the parent's end)."""
    if node.parent is None:
        return None, None
    parent = earlier[node.parent.index]
    if node.at is not None and not 1 <= node.at <= parent.steps:
        raise fail("from", f"stage '{parent.name}' has steps 1..{parent.steps} (got @{node.at})")
    return parent, (node.at if node.at is not None and node.at != parent.steps else None)


def _resolve_one(node: StageNode, earlier: list[ResolvedStage], data: StageData, context_length: int | None,
                 identity: dict[str, Any], where: str, swats: set[str], checkpoint_every: int | None) -> ResolvedStage:
    cfg, spec = node.config, task_spec(node.config.task)

    def fail(key: str, message: str) -> UserError:
        return UserError(where, f"{node.where}.{key}: {message}")

    if cfg.schedule.name == "plateau":
        cfg = plateau_as_rule(cfg, fail)

    parent, parent_step = _parent(node, earlier, fail)
    branch_at = parent.steps if parent and parent_step is None else parent_step

    if data.unit == "tokens":
        assert context_length is not None
        block = cfg.batch.block_size or context_length
        if block > context_length:
            raise fail("batch.block_size", f"must be <= the model's context length {context_length} (got {block})")
        windows = (data.n_train - 1) // block
        if windows < 1:
            raise fail("batch.block_size", f"the training data has {data.n_train} tokens: too few for one "
                                           f"sequence of {block}")
    else:  # examples: a batch is `size` examples, each cut to data.max_len
        if cfg.batch.block_size is not None:
            raise fail("batch.block_size", f"not used by task {cfg.task} (data.max_len cuts its examples)")
        if cfg.tokens is not None:
            raise fail("tokens", f"task {cfg.task} counts examples: give steps or epochs")
        block, windows = 1, data.n_train
    if cfg.layers.unfreeze == "gradual" and cfg.epochs is None:
        raise fail("layers.unfreeze", "gradual unfreezing adds a layer group each epoch: give the stage epochs")
    if cfg.merge is not None:
        assert parent is not None and branch_at is not None  # plan.tree: a merge stage has a parent
        merged = merged_steps(cfg.merge, parent, branch_at, checkpoint_every, fail)
        return ResolvedStage(
            index=node.index, node=node, config=cfg, parent=parent.name, parent_step=parent_step,
            key=_key(cfg, parent, parent_step, {"merged": list(merged), "block_size": block}, identity),
            optimizer=parent.optimizer, optimizer_settings={**parent.optimizer_settings, "lr": parent.lr(branch_at)},
            handoff="reset", auto_lr=False, lr_at_run=False, track_swats=False, steps=0, start_step=parent.start_step + branch_at,
            start_tokens=parent.start_tokens + parent.tokens_before(branch_at), block_size=block,
            batch_size=cfg.batch.size, micro_batches=1, full_batch=False, windows_per_epoch=windows, unit=data.unit,
            merged=merged)

    name, settings, handoff = optimizer_of(cfg, parent, fail)
    full = cfg.batch.full or name == "gd"  # gd is full-batch gradient descent by definition
    mixed = cfg.data is not None and cfg.data.mix is not None
    if mixed:  # a mix is drawn from, sequence by sequence: no pass over it is one over its sources
        for key, used in (("epochs", cfg.epochs is not None), ("eval.each_epoch", cfg.eval.each_epoch),
                          ("batch.full" if cfg.batch.full else "optimizer.name", full)):
            if used:
                raise fail(key, "a data mix has no epochs (its sources are drawn by weight): count steps or tokens")
    if full:
        micro = math.ceil(windows / cfg.batch.size)
        tokens_per_step = windows * block
        steps_per_epoch = 1
    else:
        micro = cfg.batch.accumulate
        tokens_per_step = cfg.batch.size * micro * block
        steps_per_epoch = math.ceil(windows / (cfg.batch.size * micro))
    ramp_cfg = cfg.batch.ramp
    if ramp_cfg is not None and full:
        raise fail("batch.ramp", f"optimizer {name} takes the whole set every update: no ramp")
    if ramp_cfg is not None and cfg.steps is None:  # the fewest steps whose ramp holds the stage's data
        wanted = cfg.epochs * windows if cfg.epochs is not None else math.ceil(cfg.tokens / block)  # type: ignore[operator]
        steps = fewest_steps(wanted, lambda n: stage_ramp(cfg, n))
    elif cfg.steps is not None:
        steps = cfg.steps
    elif cfg.epochs is not None:
        steps = cfg.epochs * steps_per_epoch
    else:
        assert cfg.tokens is not None
        steps = math.ceil(cfg.tokens / tokens_per_step)
    ramp = None
    if ramp_cfg is not None:
        over = ramp_steps(ramp_cfg.over, steps)
        if not 1 <= over <= steps:
            raise fail("batch.ramp.over", f"must be within the stage's {steps} steps (got {over})"
                       if over > steps else f"{ramp_cfg.over} of {steps} steps is no step")
        ramp = stage_ramp(cfg, steps)

    for key, metric in metrics_used(cfg):
        if metric not in spec.reported(cfg.eval):
            raise fail(key, f"task {cfg.task} does not report {metric} (it reports: {', '.join(spec.reported(cfg.eval))})")
    if cfg.end == "best" and not evaluates_midway(cfg):
        raise fail("end", "best needs evaluations during the stage (eval.every or eval.each_epoch)")
    for key, message in schedule_problems(cfg.schedule, steps):
        raise fail(f"schedule.{key}", message)
    if name in SCHEDULE_FREE:
        if cfg.average is not None:
            raise fail("average", f"{name} averages its weights already (evaluated and handed on)")
        if settings.get("momentum", 1.0) == 0.0:
            raise fail("optimizer.momentum", "schedulefree_sgd needs momentum > 0 (its averaging)")
    if name == "sgd_l1" and cfg.regularization.l1 == 0.0:
        raise fail("regularization.l1", "optimizer sgd_l1 needs l1 > 0 (its proximal step applies it)")
    switches = [("on_plateau.do.switch", cfg.on_plateau.do.switch)] if cfg.on_plateau is not None else []
    switches += [(f"rules[{j}].do.switch", rule.do.switch) for j, rule in enumerate(cfg.rules)]
    for key, switch in switches:
        if switch is not None and switch.to == "sgd_l1" and cfg.regularization.l1 == 0.0:
            raise fail(f"{key}.to", "sgd_l1 needs regularization.l1 > 0 (its proximal step applies it)")

    if name not in ADAM:
        for j, rule in enumerate(cfg.rules):
            if rule.when.swats is not None:
                raise fail(f"rules[{j}].when.swats", f"SWATS tests Adam's steps: the stage's optimizer is {name}, "
                                                     "not adam/adamw")
            if rule.do.switch is not None and rule.do.switch.lr == "auto":
                raise fail(f"rules[{j}].do.switch.lr", f"auto (the SWATS estimate) needs Adam's steps: the stage's "
                                                       f"optimizer is {name}, not adam/adamw")
    auto_lr = settings.get("lr") == "auto"
    if auto_lr:
        if parent is None or parent.optimizer not in ADAM or name not in ("sgd", "gd"):
            raise fail("optimizer.lr", "auto (the SWATS estimate) is for a switch from adam/adamw to sgd/gd"
                                       + (f" (got {parent.optimizer} -> {name})" if parent else ""))
        assert branch_at is not None  # a parent is there
        settings["lr"] = parent.lr(branch_at) or parent.peak_lr  # planned until the estimate is known
    lr_at_run = "lr" not in settings and parent is not None and (parent.auto_lr or parent.lr_at_run)
    if "lr" not in settings:
        settings["lr"] = continued_lr(cfg, name, parent, branch_at, fail)
    min_lr = cfg.schedule.settings().get("min_lr", 0.0)
    if min_lr > settings["lr"]:
        raise fail("schedule.min_lr", f"must be <= the stage's peak lr {settings['lr']:.3g} (got {min_lr:.3g})")
    numbers = {"optimizer": name, "settings": settings, "handoff": handoff, "steps": steps, "block_size": block,
               "batch_size": cfg.batch.size, "micro_batches": micro, "full_batch": full}
    if ramp is not None:
        numbers["ramp"] = dataclasses.asdict(ramp)
    if data.unit != "tokens" or mixed:
        numbers["data"] = data.fingerprint
    if cfg.name in swats:  # its checkpoints then hold the estimate
        numbers["track_swats"] = True
    if lr_at_run:  # trained at the parent's real LR since this was known (the planned one before)
        numbers["lr_at_run"] = True
    return ResolvedStage(
        index=node.index, node=node, config=cfg, key=_key(cfg, parent, parent_step, numbers, identity),
        parent=parent.name if parent else None, parent_step=parent_step,
        optimizer=name, optimizer_settings=settings, handoff=handoff, auto_lr=auto_lr,
        lr_at_run=lr_at_run, track_swats=cfg.name in swats, steps=steps,
        start_step=parent.start_step + branch_at if parent else 0,  # type: ignore[operator]
        start_tokens=parent.start_tokens + parent.tokens_before(branch_at) if parent else 0,  # type: ignore[arg-type]
        block_size=block, batch_size=cfg.batch.size, micro_batches=micro, full_batch=full,
        windows_per_epoch=windows, unit=data.unit, ramp=ramp)


def _key(cfg: StageConfig, parent: ResolvedStage | None, parent_step: int | None, numbers: dict[str, Any],
         identity: dict[str, Any]) -> str:
    # Evaluation only decides the weights when rules, `until` or `end: best` act on it.
    decides = cfg.until is not None or cfg.all_rules() or cfg.end == "best"
    excluded = ({"from_"} if decides else {"eval", "from_"}) | _unset_new_keys(cfg)
    return stage_key(parent.key if parent else None, parent_step,
                     {**cfg.model_dump(mode="json", by_alias=True, exclude=excluded), **numbers}, identity)


# Keys added after stage keys were first written: at their default they stay out of the key, so
# the stages of existing plans keep their cache.
_NEW_KEYS = ("end", "average", "allow_nonfinite", "merge")


def _unset_new_keys(cfg: StageConfig) -> set[str]:
    return {k for k in _NEW_KEYS if getattr(cfg, k) == StageConfig.model_fields[k].default}
