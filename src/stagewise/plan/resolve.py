"""Validated plan + data sizes -> the concrete stages the engine runs.

Everything that depends on the data (steps of an `epochs`/`tokens` stage, block size against the
model's context) or on the parent stage (inherited optimizer settings, the LR a stage continues
from) is settled here, before anything trains, and reported as one line naming the key path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from stagewise.errors import UserError
from stagewise.optim.batch_ramp import LR_POWER, BatchRamp, fewest_steps, ramp_steps
from stagewise.optim.schedule_free import SCHEDULE_FREE
from stagewise.optim.schedules import lr_at, schedule_problems
from stagewise.plan.keys import stage_key
from stagewise.plan.rules import ActionConfig, LrScaleAction, OnPlateauConfig
from stagewise.plan.schema import ADAM, OPTIMIZER_SETTINGS, MergeConfig, ScheduleConfig, StageConfig
from stagewise.plan.tree import StageNode
from stagewise.tasks.registry import task_spec


@dataclass(frozen=True)
class ResolvedStage:
    index: int
    node: StageNode  # its place in the stage tree
    config: StageConfig
    key: str  # the stage cache's identity of this stage (plan.keys)
    parent: str | None
    parent_step: int | None  # the parent's step this stage branches from; None: its end
    optimizer: str  # optimizer name, inherited when the stage does not set one
    optimizer_settings: dict[str, Any]  # complete; "lr" is the stage's peak LR
    handoff: str  # what becomes of the parent's optimizer state: carry | convert | reset
    auto_lr: bool  # lr auto: the SWATS estimate replaces the planned (continued) LR at the start
    # no lr set, continuing a parent whose LR is known only at run time (lr auto, or continuing
    # one that is): the plan holds a placeholder, and the parent's real LR scales it at the start
    lr_at_run: bool
    track_swats: bool  # keep the SWATS estimate: a rule or a child stage needs it
    steps: int  # optimizer updates in this stage
    start_step: int  # global step of this stage's first update
    start_tokens: int  # training tokens seen before this stage
    block_size: int  # tokens per sequence (causal_lm); 1 for the example-level tasks
    batch_size: int  # sequences (examples) per micro-batch
    micro_batches: int  # micro-batches per update (1 + accumulation, or a whole pass when full)
    full_batch: bool
    windows_per_epoch: int  # training sequences (examples) in one pass over the data
    unit: str = "tokens"  # what the stage counts: tokens (causal_lm) or examples
    ramp: BatchRamp | None = None  # a batch that grows over the stage (optim.batch_ramp)
    merged: tuple[int, ...] = ()  # a merge stage (0 steps): the parent's steps whose checkpoints it averages

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def trains_with(self) -> str:
        """What the console, events and report name the stage's updates by ("merge": it has none)."""
        return "merge" if self.merged else self.optimizer

    @property
    def peak_lr(self) -> float:
        return float(self.optimizer_settings["lr"])

    @property
    def tokens_per_step(self) -> int | None:
        """Tokens (examples, for the example-level tasks) per update; None when the batch ramps
        (`tokens_before`)."""
        if self.ramp is not None:
            return None
        return self.sequences_at(0) * self.block_size

    def micro_batches_at(self, step: int) -> int:
        """Micro-batches of update `step` (not of a full batch: that is the rest of the epoch)."""
        return self.micro_batches if self.ramp is None else self.ramp.micro_batches(step)

    def sequences_at(self, step: int) -> int:
        """Sequences (examples) of update `step`."""
        if self.full_batch:
            return self.windows_per_epoch
        return self.batch_size * self.micro_batches_at(step)

    def tokens_before(self, step: int) -> int:
        """Tokens (examples) of the stage's first `step` updates."""
        if self.ramp is None:
            return step * self.sequences_at(0) * self.block_size
        return self.ramp.sequences_before(step) * self.block_size

    def lr(self, step: int) -> float:
        """LR at `step` of this stage (0 <= step <= steps; `steps` is the value it ends on), scaled
        with the batch when it ramps with `lr_scaling`."""
        if not self.steps:  # a merge stage: the LR its parent ended on, for a child to continue from
            return self.peak_lr
        lr = lr_at(self.config.schedule, step, self.steps, self.peak_lr)
        return lr if self.ramp is None or self.ramp.lr_power == 0.0 else lr * self.ramp.lr_factor(step)


@dataclass(frozen=True)
class StageData:
    """What resolution needs of a stage's data: its size and what identifies it."""

    n_train: int  # tokens (causal_lm) or examples in the training split
    unit: str  # "tokens" | "examples"
    fingerprint: str  # of the encoded data (causal_lm: in `identity` already)


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
        cfg = _plateau_as_rule(cfg, fail)

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
        merged = _merged_steps(cfg.merge, parent, branch_at, checkpoint_every, fail)
        return ResolvedStage(
            index=node.index, node=node, config=cfg, parent=parent.name, parent_step=parent_step,
            key=_key(cfg, parent, parent_step, {"merged": list(merged), "block_size": block}, identity),
            optimizer=parent.optimizer, optimizer_settings={**parent.optimizer_settings, "lr": parent.lr(branch_at)},
            handoff="reset", auto_lr=False, lr_at_run=False, track_swats=False, steps=0, start_step=parent.start_step + branch_at,
            start_tokens=parent.start_tokens + parent.tokens_before(branch_at), block_size=block,
            batch_size=cfg.batch.size, micro_batches=1, full_batch=False, windows_per_epoch=windows, unit=data.unit,
            merged=merged)

    name, settings, handoff = _optimizer(cfg, parent, fail)
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

    for key, metric in _metrics_used(cfg):
        if metric not in spec.reported(cfg.eval):
            raise fail(key, f"task {cfg.task} does not report {metric} (it reports: {', '.join(spec.reported(cfg.eval))})")
    if cfg.end == "best" and not _evaluates_midway(cfg):
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
        settings["lr"] = _continued_lr(cfg, name, parent, branch_at, fail)
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


def stage_ramp(cfg: StageConfig, steps: int) -> BatchRamp:
    """The batch ramp of a `steps`-step stage (its `over` a fraction of them, or a step count)."""
    batch, ramp = cfg.batch, cfg.batch.ramp
    assert ramp is not None
    end = ramp.to // batch.size
    per_level = 1 if ramp.increment is None else ramp.increment // batch.size
    return BatchRamp(size=batch.size, start=batch.accumulate, end=end,
                     steps=max(1, min(steps, ramp_steps(ramp.over, steps))),
                     levels=(end - batch.accumulate) // per_level, lr_power=LR_POWER[ramp.lr_scaling])


def _key(cfg: StageConfig, parent: ResolvedStage | None, parent_step: int | None, numbers: dict[str, Any],
         identity: dict[str, Any]) -> str:
    # Evaluation only decides the weights when rules, `until` or `end: best` act on it.
    decides = cfg.until is not None or cfg.all_rules() or cfg.end == "best"
    excluded = ({"from_"} if decides else {"eval", "from_"}) | _unset_new_keys(cfg)
    return stage_key(parent.key if parent else None, parent_step,
                     {**cfg.model_dump(mode="json", by_alias=True, exclude=excluded), **numbers}, identity)


def _merged_steps(merge: MergeConfig, parent: ResolvedStage, end: int, every: int | None, fail: Any) -> tuple[int, ...]:
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


# Keys added after stage keys were first written: at their default they stay out of the key, so
# the stages of existing plans keep their cache.
_NEW_KEYS = ("end", "average", "allow_nonfinite", "merge")


def _unset_new_keys(cfg: StageConfig) -> set[str]:
    return {k for k in _NEW_KEYS if getattr(cfg, k) == StageConfig.model_fields[k].default}


def _evaluates_midway(cfg: StageConfig) -> bool:
    return cfg.eval.every is not None or cfg.eval.each_epoch


def _plateau_as_rule(cfg: StageConfig, fail: Any) -> StageConfig:
    """`schedule: plateau` is ReduceLROnPlateau: a constant schedule (its warmup kept) and the
    on_plateau rule that scales the LR by `factor` down to `min_lr`; the stage then trains (and is
    keyed) exactly as one written that way."""
    if cfg.on_plateau is not None:
        raise fail("schedule.name", "plateau is an on_plateau lr_scale rule, and the stage has on_plateau already")
    if not _evaluates_midway(cfg):
        raise fail("schedule.name", "plateau reacts to evaluations: give eval.every or eval.each_epoch")
    s = cfg.schedule.settings()
    rule = OnPlateauConfig(patience=s["patience"], min_delta=s["threshold"],
                           do=ActionConfig(lr_scale=LrScaleAction(factor=s["factor"], min_lr=s["min_lr"])))
    constant = ScheduleConfig.model_validate({"name": "constant", **({"warmup": cfg.schedule.warmup}
                                                                      if cfg.schedule.warmup is not None else {})})
    return cfg.model_copy(update={"schedule": constant, "on_plateau": rule})


def _metrics_used(cfg: StageConfig) -> list[tuple[str, str]]:
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


def _optimizer(cfg: StageConfig, parent: ResolvedStage | None, fail: Any) -> tuple[str, dict[str, Any], str]:
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


def _continued_lr(cfg: StageConfig, name: str, parent: ResolvedStage | None, at: int | None, fail: Any) -> float:
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
