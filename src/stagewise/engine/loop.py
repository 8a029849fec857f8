"""One stage of training: the step loop, evaluation and logging. The step reads on one screen;
what a checkpoint must hold to continue it exactly is `StageProgress` plus the sampler, optimizer
and RNG states."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from stagewise.engine.context import RunContext
from stagewise.engine.control import Fired, StageControl
from stagewise.engine.device import derive_seed, seed_everything
from stagewise.errors import RunStopped
from stagewise.engine.rng import rng_state, set_rng_state
from stagewise.optim.handoff import convert_adam_to_sgd, swats_lr
from stagewise.optim.layers import StageLayers
from stagewise.optim.optimizers import build_optimizer
from stagewise.optim.regularizers import weight_penalty
from stagewise.plan.schema import OPTIMIZER_SETTINGS
from stagewise.plan.resolve import ResolvedStage
from stagewise.tasks.base import Batch, BatchSource, Task
from stagewise.track.progress import StageSummary

Capture = Callable[[], dict[str, Any]]


class Checkpoints(Protocol):
    """The stage's checkpoints (engine.run.Checkpointer)."""

    def __call__(self, step: int, capture: Capture) -> None:
        """After every update: save when one is due; may stop the run."""

    def save(self, step: int, capture: Capture, keep: str | None = None) -> None:
        """Save now; `keep` ("start", "best"): a role in which it is never pruned, until another
        checkpoint takes the role."""

    def keep(self, role: str, step: int) -> None:
        """Give a saved checkpoint a role again (after a resume)."""

    def steps(self) -> list[int]:
        """The steps with a saved checkpoint, oldest first."""

    def load(self, step: int) -> dict[str, Any]:
        """Put that checkpoint's weights into the model and return its state."""


def _micro_batches(sampler: BatchSource, stage: ResolvedStage) -> Iterator[tuple[Batch, float]]:
    """The micro-batches of one update with each one's share of the update's gradient."""
    if stage.full_batch:  # one update per pass: the rest of the epoch, weighted by rows
        for batch in sampler.epoch_batches():
            yield batch, batch[0].size(0) / stage.windows_per_epoch
    else:
        for _ in range(stage.micro_batches):
            yield sampler.next_batch(), 1.0 / stage.micro_batches


@dataclass
class StageProgress:
    """The loop's own running state. The loss sum between two log lines stays on the device so
    the step never waits for it; it is saved so a resumed run logs the same numbers."""

    step: int = 0  # updates done in this stage
    window_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    window_steps: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    eval_step: int | None = None  # the step of the latest evaluation
    ended: str | None = None  # why the stage ended before its last step, once it has
    metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation's

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "window_loss": self.window_loss.detach().cpu(), "window_steps": self.window_steps,
                "train_loss": self.train_loss, "val_loss": self.val_loss, "eval_step": self.eval_step,
                "ended": self.ended, "metrics": dict(self.metrics)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.step, self.window_steps = state["step"], state["window_steps"]
        self.window_loss = state["window_loss"].to(device)
        self.train_loss, self.val_loss = state["train_loss"], state["val_loss"]
        self.eval_step, self.ended = state["eval_step"], state["ended"]
        self.metrics = dict(state.get("metrics", {}))


@dataclass
class StageOutcome:
    """A finished stage: its summary, and the optimizer state its children may take over."""

    summary: StageSummary
    optimizer: torch.optim.Optimizer  # the one in use at the end (a rule may have switched it)
    final_state: dict[str, Any]  # what a child takes over (handoff_state)


def handoff_state(optimizer: torch.optim.Optimizer, stage: ResolvedStage, control: StageControl) -> dict[str, Any]:
    """The part of a checkpoint a child stage may take over: the optimizer's state, which optimizer
    it is (a rule may have switched it: {"name", "settings"} or None for the stage's own), and the
    SWATS estimate when kept."""
    return {"optimizer": optimizer.state_dict(), "optimizer_spec": control.optimizer_spec,
            "swats": control.swats.state_dict() if control.swats else None}


def train_stage(run: RunContext, stage: ResolvedStage, task: Task, layers: StageLayers,
                optimizer: torch.optim.Optimizer, checkpoints: Checkpoints, resume: dict[str, Any] | None = None,
                track_swats: bool = False, start_lr: float | None = None) -> StageOutcome:
    """Train one stage from its first update (or from `resume`, a checkpoint's state). `start_lr`:
    the LR of the first update when only the hand-off knows it (lr auto); the schedule's shape
    goes on from it. `layers`: which parameters train (by epoch, when unfrozen gradually)."""
    cfg = stage.config
    reg = cfg.regularization
    model = task.model
    run.dropout_of(model).set(reg.dropout)
    seed_everything(derive_seed(run.plan.seed, stage.name))
    sampler = task.sampler(stage.block_size, stage.batch_size, derive_seed(run.plan.seed, stage.name, "data"))
    progress = StageProgress(window_loss=torch.zeros((), device=run.device))
    control = StageControl(stage, track_swats)
    l1 = 0.0 if stage.optimizer == "sgd_l1" else reg.l1  # sgd_l1 applies L1 by its proximal step
    params = [p for p in model.parameters() if p.requires_grad]  # all the optimizer holds (layers.hold)

    def restore(state: dict[str, Any], rollback: bool) -> None:
        """Continue from a checkpoint's state: everything the steps so far changed, exactly."""
        nonlocal optimizer
        control.load_state_dict(state["control"], state, keep_memory=rollback)
        spec = control.optimizer_spec
        if spec is not None:  # a rule switched the optimizer before this checkpoint
            layers.hold()
            optimizer = build_optimizer(spec["name"], spec["settings"], model, l1=reg.l1, lr_scales=layers.scales)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        progress.load_state_dict(state["progress"], run.device)
        set_rng_state(state["rng"])
        layers.apply(sampler.epoch)

    started = window_started = time.perf_counter()
    timed_steps = 0  # updates since window_started in this process (a resumed window began elsewhere)

    def capture() -> dict[str, Any]:
        return {**handoff_state(optimizer, stage, control), "sampler": sampler.state_dict(),
                "progress": progress.state_dict(), "rng": rng_state(),
                "control": control.state_dict(time.perf_counter() - started)}

    rollbacks = control.rollback_rules or (control.guard is not None and control.guard.action == "rollback")
    if resume is not None:
        restore(resume, rollback=False)
    elif start_lr is not None:
        control.set_lr(0, start_lr)
        if rollbacks:
            checkpoints.keep("start", 0)
        if control.best is not None:
            checkpoints.keep("best", control.best["step"])
    log_every = run.plan.log.every
    layers.apply(sampler.epoch)
    model.train()
    run.logs.event("stage_start", stage=stage.name, parent=stage.parent, step=stage.start_step + progress.step,
                   stage_step=progress.step, steps=stage.steps, optimizer=stage.optimizer,
                   settings=stage.optimizer_settings, schedule=stage.config.schedule.name, task=task.kind,
                   block_size=stage.block_size, tokens_per_step=stage.tokens_per_step, unit=task.unit,
                   dropout=sorted(run.dropout_of(model).rates()), key=stage.key)
    run.view.stage_start(stage.name, stage.steps)
    if rollbacks and progress.step == 0:
        checkpoints.save(0, capture, keep="start")  # where a rollback goes when nothing later is good
    while progress.step < stage.steps and progress.ended is None:
        step = progress.step
        lr = control.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        epoch = sampler.epoch
        poisoned = control.corrupts(step, sampler.state_dict())
        update_loss = torch.zeros((), device=run.device)
        for batch, share in _micro_batches(sampler, stage):
            if poisoned:
                batch = task.corrupt(batch, step)
            batch = tuple(t.to(run.device, non_blocking=True) for t in batch)
            loss = task.loss(batch)
            if (factor := control.fault(step, "loss_spike")) is not None:
                loss = loss * factor
            if control.fault(step, "nan") is not None:
                loss = loss * float("nan")
            (loss * share).backward()  # shares sum to 1: the gradient of the update's mean loss
            update_loss += loss.detach() * share
        penalty = weight_penalty(model, l1, reg.l2)
        if penalty is not None:
            penalty.backward()
        logging = (step + 1) % log_every == 0 or step + 1 == stage.steps
        grad_norm = None
        if reg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, reg.grad_clip)
        elif logging or control.checks_updates:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

        # The guard looks before the optimizer steps: a bad update never reaches the weights.
        verdict = control.check_update(step, update_loss.item(), float(grad_norm)) if control.checks_updates else None
        if verdict is not None:
            optimizer.zero_grad(set_to_none=True)
            _guard_acts(run, stage, control, checkpoints, restore, sampler, progress, verdict, capture)
            continue
        swats = control.live_swats
        if swats is not None:
            swats.before(params)
        optimizer.step()
        if swats is not None:
            swats.after(params)
        optimizer.zero_grad(set_to_none=True)
        progress.window_loss += update_loss
        progress.step, progress.window_steps, timed_steps = step + 1, progress.window_steps + 1, timed_steps + 1
        if sampler.epoch != epoch and layers.gradual:
            layers.apply(sampler.epoch)  # one more layer group from the next update on

        global_step = stage.start_step + step + 1
        attempt = {"attempt": control.attempt} if control.attempt else {}
        if logging:
            progress.train_loss = (progress.window_loss / progress.window_steps).item()
            now = time.perf_counter()
            rate = timed_steps * stage.tokens_per_step / max(now - window_started, 1e-9)
            info = {"lr": lr, "loss": progress.train_loss, "grad_norm": float(grad_norm),
                    ("tok_per_s" if task.unit == "tokens" else "ex_per_s"): rate}
            run.logs.metric("train", step=global_step, stage=stage.name, stage_step=step + 1,
                            **{task.unit: stage.start_tokens + (step + 1) * stage.tokens_per_step}, **attempt, **info)
            run.view.step(stage.name, step + 1, stage.steps, global_step, info)
            progress.window_loss, progress.window_steps = torch.zeros_like(progress.window_loss), 0
            window_started, timed_steps = now, 0
        fired = control.after_update(step + 1, time.perf_counter() - started)
        ended = None
        if control.time_is_up(time.perf_counter() - started):
            ended = f"time budget of {control.until.time.minutes:g} min spent"  # type: ignore[union-attr]
        every = cfg.eval.every is not None and (step + 1) % cfg.eval.every == 0
        if (every or (sampler.epoch != epoch and cfg.eval.each_epoch)) and step + 1 < stage.steps:
            metrics = _log_eval(run, stage, task, global_step, step + 1, attempt)
            progress.val_loss, progress.eval_step, progress.metrics = metrics["val_loss"], step + 1, dict(metrics)
            metrics["train_loss"] = progress.train_loss if progress.train_loss is not None else math.nan
            on_eval, end, best = control.after_eval(step + 1, metrics)
            fired += on_eval
            ended = ended or end
            if best:
                checkpoints.save(step + 1, capture, keep="best")
        for rule in fired:
            optimizer, stop = _act(run, stage, model, layers, control, optimizer, rule, restore, checkpoints, sampler,
                                   progress)
            ended = ended or stop
        if ended is not None:
            progress.ended = ended
            run.logs.event("stage_stopped_early", stage=stage.name, step=stage.start_step + progress.step,
                           stage_step=progress.step, reason=ended)
            run.view.print(f"[{stage.name}] ends early at step {progress.step}: {ended}")
        checkpoints(progress.step, capture)
    if progress.eval_step != progress.step:  # an evaluation that ended the stage early is not repeated
        progress.metrics = _log_eval(run, stage, task, stage.start_step + progress.step, progress.step,
                                     {"attempt": control.attempt} if control.attempt else {})
        progress.val_loss = progress.metrics["val_loss"]
    summary = StageSummary(stage=stage.name, optimizer=_optimizer_name(stage, control), steps=progress.step,
                           tokens=progress.step * stage.tokens_per_step, seconds=time.perf_counter() - started,
                           train_loss=progress.train_loss, val_loss=progress.val_loss, unit=task.unit,
                           metrics=progress.metrics)
    return StageOutcome(summary, optimizer, handoff_state(optimizer, stage, control))


def _optimizer_name(stage: ResolvedStage, control: StageControl) -> str:
    return control.optimizer_spec["name"] if control.optimizer_spec else stage.optimizer


def _guard_acts(run: RunContext, stage: ResolvedStage, control: StageControl, checkpoints: Checkpoints,
                restore: Callable[[dict[str, Any], bool], None], sampler: WindowSampler, progress: StageProgress,
                why: str, capture: Capture) -> None:
    """Skip the update, or go back to a good checkpoint; stop when the retry budget is spent."""
    guard = control.guard
    assert guard is not None
    step = progress.step
    where = {"stage": stage.name, "step": stage.start_step + step + 1, "stage_step": step + 1}
    if control.retries >= guard.max_retries:
        control.retries = 0  # a resumed run gets a new budget: resuming is the user's decision
        checkpoints.save(step, capture)
        run.logs.event("guard_gave_up", reason=why, retries=guard.max_retries, **where)
        raise RunStopped(f"stage '{stage.name}' stopped at update {step + 1}: {why}; the guard's "
                         f"{guard.max_retries} retries are spent. Checkpoint saved at step {step}; resume to "
                         f"try again, or change the guard or the data", code=3)
    control.retries += 1
    if guard.action == "skip":
        progress.step += 1  # the update is spent: the batch is dropped, the schedule goes on
        run.logs.event("guard_skip", reason=why, retry=control.retries, **where)
        run.view.print(f"[{stage.name}] update {step + 1} skipped: {why}")
        return
    back = guard.rollback_settings()
    target = max(s for s in checkpoints.steps() if s <= max(0, step - back.steps_back))
    _go_back(run, stage, control, checkpoints, restore, sampler, target, back.skip_batches, back.lr_scale)
    run.logs.event("guard_rollback", reason=why, retry=control.retries, to_step=stage.start_step + target,
                   to_stage_step=target, skip_batches=back.skip_batches, lr_scale=back.lr_scale, **where)
    run.view.print(f"[{stage.name}] update {step + 1} refused ({why}): back to step {target}, "
                   f"skipping {back.skip_batches} batches, LR x{back.lr_scale:g}")


def _go_back(run: RunContext, stage: ResolvedStage, control: StageControl, checkpoints: Checkpoints,
             restore: Callable[[dict[str, Any], bool], None], sampler: WindowSampler, step: int,
             skip_batches: int, lr_scale: float) -> None:
    restore(checkpoints.load(step), True)
    control.attempt += 1
    control.lr_factor *= lr_scale
    sampler.skip(skip_batches * stage.micro_batches)


def _act(run: RunContext, stage: ResolvedStage, model: torch.nn.Module, layers: StageLayers, control: StageControl,
         optimizer: torch.optim.Optimizer, fired: Fired, restore: Callable[[dict[str, Any], bool], None], checkpoints: Checkpoints,
         sampler: WindowSampler, progress: StageProgress) -> tuple[torch.optim.Optimizer, str | None]:
    """Carry out a rule's action; log it with the values that made it fire. Returns the optimizer
    (a new one after a switch) and why the stage ends, if it does."""
    do, step = fired.rule.do, progress.step
    event = {"stage": stage.name, "step": stage.start_step + step, "stage_step": step, "rule": fired.index,
             "when": fired.rule.when.kind, "action": do.kind, "values": fired.values}
    ended = None
    if do.lr_scale is not None:
        change = control.scale_lr(step, do.lr_scale.factor, do.lr_scale.min_lr)
        event.update(lr_from=change[0], lr_to=change[1]) if change else event.update(unchanged="at min_lr")
    elif do.switch is not None:
        optimizer = _switch(stage, model, layers, control, optimizer, do.switch, step, event)
    elif do.next_stage is not None:
        ended = f"rule {fired.index} ({fired.rule.when.kind} -> next_stage)"
    else:
        assert do.rollback is not None and control.best is not None
        target = control.best["step"]
        _go_back(run, stage, control, checkpoints, restore, sampler, target, do.rollback.skip_batches,
                 do.rollback.lr_scale)
        event.update(to_step=stage.start_step + target, to_stage_step=target, best=control.best["value"])
    run.logs.event("rule_fired", **event)
    run.view.print(f"[{stage.name}] rule {fired.index} fired at step {step}: {fired.rule.when.kind} -> {do.kind} "
                   f"({', '.join(f'{k} {v:.4g}' for k, v in fired.values.items())})")
    return optimizer, ended


def _switch(stage: ResolvedStage, model: torch.nn.Module, layers: StageLayers, control: StageControl,
            optimizer: torch.optim.Optimizer, switch: Any, step: int, event: dict[str, Any]) -> torch.optim.Optimizer:
    """A new optimizer for the rest of the stage; Adam's moment becomes SGD's momentum on `convert`."""
    settings = {k: v for k, v in OPTIMIZER_SETTINGS[switch.to].items() if v is not None}
    settings.update(switch.settings())
    if switch.lr == "auto":
        lr = swats_lr(control.swats, settings.get("momentum", 0.0), f"stages.{stage.name}.rules")
    else:
        lr = switch.lr if switch.lr is not None else control.lr(step)
    settings["lr"] = lr
    before = _optimizer_name(stage, control)
    epoch_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers.hold()
    new = build_optimizer(switch.to, settings, model, l1=stage.config.regularization.l1, lr_scales=layers.scales)
    for name, p in model.named_parameters():
        p.requires_grad_(name in epoch_trainable)
    converted = convert_adam_to_sgd(optimizer, new) if switch.handoff == "convert" else 0
    control.optimizer_spec = {"name": switch.to, "settings": settings}
    control.set_lr(step, lr)
    event.update(optimizer_from=before, optimizer_to=switch.to, lr=lr, handoff=switch.handoff, converted_parameters=converted)
    return new


def _log_eval(run: RunContext, stage: ResolvedStage, task: Task, global_step: int, stage_step: int,
              attempt: dict[str, int]) -> dict[str, float]:
    limit = stage.config.eval.batches
    metrics = task.evaluate(stage.block_size, stage.batch_size, None if limit == "all" else limit)
    task.model.train()
    logged = {k: (v if math.isfinite(v) and not (k == "val_ppl" and metrics["val_loss"] >= 50) else None)
              for k, v in metrics.items()}  # JSON has no infinity
    run.logs.metric("eval", step=global_step, stage=stage.name, stage_step=stage_step, **attempt, **logged)
    run.logs.event("eval", stage=stage.name, step=global_step, **logged)
    shown = ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in logged.items()
                      if v is not None and k != "val_loss")
    run.view.print(f"[{stage.name}] eval at step {stage_step}: val loss {metrics['val_loss']:.4f}"
                   + (f", {shown}" if shown else ""))
    return metrics
