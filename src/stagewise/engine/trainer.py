"""One stage of training (torchtitan's shape: `train` -> `train_step`). The update step reads on
one screen; what reacts to training (guards, rules, `until`, evaluation, gradual unfreezing,
injected faults) are methods around it, and all running state is on the trainer. What a
checkpoint must hold to continue exactly is `StageProgress` plus the optimizer, sampler, rules
and RNG states (`capture`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from stagewise.engine.checkpointer import Checkpointer
from stagewise.engine.context import RunContext
from stagewise.engine.control import Fired, StageControl
from stagewise.engine.device import derive_seed, seed_everything
from stagewise.engine.distributed import SINGLE, Replicas, World
from stagewise.engine.finite import FiniteWatch, nonfinite_metrics, weights_finite
from stagewise.engine.handoff import StageOptimizer
from stagewise.engine.rng import as_tensor, rng_bytes, rng_state, set_rng_state, set_rng_tensor
from stagewise.engine.sharded import plain
from stagewise.errors import RunStopped
from stagewise.optim.average import WeightEMA
from stagewise.optim.handoff import swats_lr
from stagewise.optim.layers import StageLayers
from stagewise.optim.regularizers import weight_penalty
from stagewise.optim.schedule_free import averaged, is_schedule_free
from stagewise.plan.resolve import ResolvedStage
from stagewise.plan.schema import OPTIMIZER_SETTINGS
from stagewise.tasks.base import Batch, BatchSource, Task
from stagewise.track.progress import StageSummary

T = TypeVar("T")


def micro_batches(sampler: BatchSource, stage: ResolvedStage, step: int = 0, world: World = SINGLE,
                  targets: Callable[[Batch], torch.Tensor | None] | None = None) -> Iterator[tuple[Batch, float]]:
    """The micro-batches of update `step` with each one's share of the update's gradient (a
    ramp's count grows with the step; each holds batch.size sequences, so equal shares keep the
    update's loss a mean over its sequences); with several ranks, this rank's rows of each
    (World.shard, weighted by the task's `targets`)."""
    def shard(batch: Batch, share: float) -> tuple[Batch, float]:
        return world.shard(batch, share, targets(batch) if targets is not None and world.parallel else None)

    if stage.full_batch:  # one update per pass: the rest of the epoch, weighted by rows
        for batch in sampler.epoch_batches():
            yield shard(batch, batch[0].size(0) / stage.windows_per_epoch)
    else:
        count = stage.micro_batches_at(step)
        for _ in range(count):
            yield shard(sampler.next_batch(), 1.0 / count)


def with_last(items: Iterator[T]) -> Iterator[tuple[T, bool]]:
    """Each item and whether it is the last (one item ahead, so a pass's end is known)."""
    item = next(items)
    for following in items:
        yield item, False
        item = following
    yield item, True


@dataclass
class StageProgress:
    """The trainer's own running state. The loss sum between two log lines stays on the device so
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
class Update:
    """What an applied update leaves for logging and the rules."""

    lr: float
    grad_norm: torch.Tensor | None
    epoch: int  # the sampler's epoch before the update drew its batches


@dataclass
class StageOutcome:
    """A finished stage: its summary, and the optimizer state its children may take over."""

    summary: StageSummary
    optimizer: torch.optim.Optimizer  # the one in use at the end (a rule may have switched it)
    final_state: dict[str, Any]  # what a child takes over (handoff_state)


class StageTrainer:
    def __init__(self, run: RunContext, stage: ResolvedStage, task: Task, layers: StageLayers,
                 optimizer: StageOptimizer, checkpoints: Checkpointer) -> None:
        self.run, self.stage, self.task, self.layers, self.opt = run, stage, task, layers, optimizer
        self.checkpoints, self.model, self.reg = checkpoints, task.model, stage.config.regularization
        run.dropout_of(self.model).set(self.reg.dropout)
        seed_everything(self._rank_seed())
        self.sampler = task.sampler(stage.block_size, stage.batch_size, derive_seed(run.plan.seed, stage.name, "data"))
        self.progress = StageProgress(window_loss=torch.zeros((), device=run.device))
        self.control = StageControl(stage, stage.track_swats, run.world.rank)
        self.params = [p for n, p in self.model.named_parameters() if n in layers.held]  # what the optimizer holds
        self.replicas = Replicas(task.loss, self.model, run.world, run.device)
        average = stage.config.average
        self.average = WeightEMA(self.model, average.ema) if average is not None else None  # from the first weights
        self.started = self.window_started = time.perf_counter()
        self.timed_steps = 0  # updates since window_started in this process (a resumed window began elsewhere)
        self.resumed = False
        # Without a guard (which refuses bad updates itself) a non-finite update stops the stage,
        # unless the plan allows it; the stage's end is checked either way.
        self.strict = not stage.config.allow_nonfinite
        self.watch = FiniteWatch(run.device) if self.strict and not self.control.checks_updates else None

    # --- the loop ------------------------------------------------------------------------------------

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (before `train`); raises on a state it cannot take."""
        self.restore(state, rollback=False)
        self.resumed = True
        saved_by, world = state.get("world_size", 1), self.run.world.size
        if saved_by != world:  # the sampler's position is global: the data goes on where it stopped
            self.run.logs.event("world_size_changed", stage=self.stage.name, saved_by=saved_by, world_size=world)
            self.run.view.print(f"[{self.stage.name}] the checkpoint was written by {saved_by} process(es), this run "
                                f"has {world}: the data goes on in the same order, the updates agree within float "
                                "rounding, not bit for bit")

    def train(self, lr_factor: float | None) -> StageOutcome:
        """Train from the stage's first update, or from where `resume` put it. `lr_factor`: on the
        planned LR, when only the hand-off knows the real one (StageOptimizer.hand_off)."""
        self._begin(lr_factor)
        while self.progress.step < self.stage.steps and self.progress.ended is None:
            update = self.train_step()
            if update is not None:
                self._after_update(update)
        p = self.progress
        if p.eval_step != p.step:  # an evaluation that ended the stage is not repeated
            p.metrics = self._evaluate()
            p.val_loss = p.metrics["val_loss"]
            self.control.judge_best(p.step, {**p.metrics, "train_loss": p.train_loss if p.train_loss is not None else math.nan})
        if self.stage.config.end == "best":
            self._end_on_best()
        if self.average is not None:
            self.average.copy_to_model()  # the stage ends on the average: final checkpoint, children, export
        if is_schedule_free(self.opt.optimizer):
            self.opt.optimizer.eval()  # type: ignore[attr-defined]  # likewise on its averaged weights x
        self._check_end()  # the weights and metrics the stage ends on
        summary = StageSummary(stage=self.stage.name, optimizer="merge" if self.stage.merged else self.opt.name, steps=p.step,
                               tokens=self.stage.tokens_before(p.step), seconds=time.perf_counter() - self.started,
                               train_loss=p.train_loss, val_loss=p.val_loss, unit=self.task.unit, metrics=p.metrics)
        return StageOutcome(summary, self.opt.optimizer, self.handoff_state())

    def train_step(self) -> Update | None:
        """One update: LR, micro-batches, backward, penalty, clip, guard, optimizer step. None when
        the guard refused it (skipped, or rolled back)."""
        step, control, device = self.progress.step, self.control, self.run.device
        lr = control.lr(step)
        self.opt.set_lr(lr)
        epoch = self.sampler.epoch
        poisoned = control.corrupts(step, self.sampler.state_dict)
        update_loss = torch.zeros((), device=device)
        for (batch, share), last in with_last(micro_batches(self.sampler, self.stage, step, self.run.world, self.task.targets)):
            if poisoned:
                batch = self.task.corrupt(batch, step)
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            with self.replicas.syncing(last):
                loss = self._faults(self.replicas.loss(batch), step)
                (loss * share).backward()  # shares sum to 1: the gradient of the update's mean loss
            update_loss += loss.detach() * share
        update_loss = self.run.world.mean(update_loss)  # every rank's guards and logs read the same loss
        penalty = weight_penalty(self.model, self.opt.loss_l1, self.reg.l2)
        if penalty is not None:
            penalty.backward()
        grad_norm = None
        if self.reg.grad_clip is not None or self._logging(step + 1) or control.checks_updates:
            # what clip_grad_norm_ does, with the norm of sharded gradients made one tensor first
            grad_norm = plain(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
            if self.reg.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.reg.grad_clip, grad_norm)

        if self.watch is not None:
            self.watch.note(step + 1, update_loss, grad_norm)
        # The guard looks before the optimizer steps: a bad update never reaches the weights.
        if control.checks_updates:
            loss_value, norm = update_loss.item(), float(grad_norm)  # type: ignore[arg-type]
            why = control.check_update(step, loss_value, norm)
            if why is not None and not self._guard_acts(why, spike=math.isfinite(loss_value) and math.isfinite(norm)):
                return None
        swats = control.swats if self.opt.follows_adam else None  # only Adam's steps estimate SGD's LR
        if swats is not None:
            swats.before(self.params)
        self.opt.optimizer.step()
        if swats is not None:
            swats.after(self.params)
        if self.average is not None:
            self.average.update()
        self.opt.optimizer.zero_grad(set_to_none=True)
        self.progress.window_loss += update_loss
        return Update(lr, grad_norm, epoch)

    def _after_update(self, update: Update) -> None:
        """Count the update, log it, unfreeze, evaluate and let the rules act; then checkpoint."""
        p, stage = self.progress, self.stage
        p.step, p.window_steps, self.timed_steps = p.step + 1, p.window_steps + 1, self.timed_steps + 1
        new_epoch = self.sampler.epoch != update.epoch
        if new_epoch and self.layers.gradual:
            self.layers.apply(self.sampler.epoch)  # one more layer group from the next update on
        if self._logging(p.step):
            self._log_train(update)
        fired = self.control.after_update(self.opt.follows_adam)
        ended = None
        if self.control.time_is_up(time.perf_counter() - self.started, self.run.world):
            ended = f"time budget of {self.control.until.time.minutes:g} min spent"  # type: ignore[union-attr]
        every = stage.config.eval.every is not None and p.step % stage.config.eval.every == 0
        if (every or (new_epoch and stage.config.eval.each_epoch)) and p.step < stage.steps:
            on_eval, end = self._evaluate_and_judge()
            fired += on_eval
            ended = ended or end
        for rule in fired:
            stop = self._act(rule)
            ended = ended or stop
        if ended is not None:
            p.ended = ended
            self.run.logs.event("stage_stopped_early", stage=stage.name, step=stage.start_step + p.step,
                                stage_step=p.step, reason=ended)
            self.run.view.print(f"[{stage.name}] ends early at step {p.step}: {ended}")
        self.checkpoints(p.step, self.capture)

    def _end_on_best(self) -> None:
        """`end: best`: the model and optimizer go back to the best evaluation's checkpoint, so the
        final checkpoint, the children and the export all hold those weights."""
        best, p = self.control.best, self.progress
        assert best is not None  # resolve requires evaluations during the stage
        if best["step"] != p.step:
            def take(state: dict[str, Any]) -> None:
                self.opt.load_state_dict(state)
                if self.average is not None:
                    self.average.load_state_dict(state["average"])

            self.checkpoints.load(best["step"], take)
            p.metrics = {k: v for k, v in best["metrics"].items() if k != "train_loss"}
            p.val_loss = p.metrics["val_loss"]
        self.run.logs.event("stage_end_best", **self._where(best["step"]), metric=best["metric"], value=best["value"],
                            last_step=self.stage.start_step + p.step)
        self.run.view.print(f"[{self.stage.name}] ends on its best evaluation: step {best['step']} "
                            f"({best['metric']} {best['value']:.4f})")

    def _logging(self, stage_step: int) -> bool:
        return stage_step % self.run.plan.log.every == 0 or stage_step == self.stage.steps

    # --- start, state ---------------------------------------------------------------------------------

    @property
    def rollbacks(self) -> bool:
        guard = self.control.guard
        return self.control.rollback_rules or (guard is not None and guard.action == "rollback")

    def _begin(self, lr_factor: float | None) -> None:
        stage, p = self.stage, self.progress
        if self.resumed:
            if self.rollbacks:  # the roles of the checkpoints a rollback may go back to
                self.checkpoints.keep("start", 0)
            if self.control.best is not None:
                self.checkpoints.keep("best", self.control.best["step"])
        elif lr_factor is not None:
            self.control.lr_factor = lr_factor
        self.layers.apply(self.sampler.epoch)
        self.model.train()
        self.run.logs.event("stage_start", stage=stage.name, parent=stage.parent, step=stage.start_step + p.step,
                            stage_step=p.step, steps=stage.steps, optimizer=stage.trains_with,
                            settings={} if stage.merged else self._settings(),
                            schedule=stage.config.schedule.name, task=self.task.kind,
                            block_size=stage.block_size, tokens_per_step=stage.tokens_per_step, unit=self.task.unit,
                            dropout=sorted(self.run.dropout_of(self.model).rates()), key=stage.key)
        self.run.view.stage_start(stage.name, stage.steps, at=p.step)
        if self.rollbacks and p.step == 0:
            self.checkpoints.save(0, self.capture, keep="start")  # where a rollback goes when nothing later is good

    def _settings(self) -> dict[str, Any]:
        """The optimizer's settings, with the real peak LR where the plan's was a placeholder."""
        stage = self.stage
        if not (stage.auto_lr or stage.lr_at_run):
            return stage.optimizer_settings
        return {**stage.optimizer_settings, "lr": stage.peak_lr * self.control.lr_factor}

    def _rank_seed(self, *more: str) -> int:
        """The stage's seed; each further rank of a data-parallel run draws (dropout) from its own stream."""
        rank = self.run.world.rank
        return derive_seed(self.run.plan.seed, self.stage.name, *([f"rank {rank}", *more] if rank else []))

    def handoff_state(self) -> dict[str, Any]:
        """The part of a checkpoint a child stage may take over: the optimizer's state, which optimizer
        it is, and the SWATS estimate when kept."""
        swats = self.control.swats
        return {**self.opt.state_dict(), "swats": swats.state_dict() if swats else None}

    def capture(self) -> dict[str, Any]:
        if self.strict:  # a checkpoint is never written after a non-finite update
            why = self.watch.problem() if self.watch is not None else None
            self._stop_nonfinite(why or (None if weights_finite(self.model) else "non-finite weights"))
        return {**self.handoff_state(), "sampler": self.sampler.state_dict(), "progress": self.progress.state_dict(),
                "rng": rng_state(), "control": self.control.state_dict(time.perf_counter() - self.started),
                "average": self.average.state_dict() if self.average is not None else None,
                "world_size": self.run.world.size,
                **({"rank_rngs": [as_tensor(b) for b in self.run.world.gather(rng_bytes())]}
                   if self.run.world.parallel else {})}

    def restore(self, state: dict[str, Any], rollback: bool) -> None:
        """Continue from a checkpoint's state: everything the steps so far changed, exactly.
        `rollback`: the rules keep what they learnt since (StageControl's memory)."""
        self.control.load_state_dict(state["control"], state, keep_memory=rollback)
        self.opt.load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])
        self.progress.load_state_dict(state["progress"], self.run.device)
        rank, rngs = self.run.world.rank, state.get("rank_rngs")
        if rank == 0:
            set_rng_state(state["rng"])
        elif rngs is not None and len(rngs) == self.run.world.size:
            set_rng_tensor(rngs[rank])
        else:  # saved by fewer ranks: this one starts a stream of its own here
            seed_everything(self._rank_seed(str(self.progress.step)))
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        self.layers.apply(self.sampler.epoch)

    # --- reacting -------------------------------------------------------------------------------------

    def _faults(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Injected faults (plan `inject`) on the loss, for testing guards for real."""
        if (factor := self.control.fault(step, "loss_spike")) is not None:
            loss = loss * factor
        if self.control.fault(step, "nan") is not None:
            loss = loss * float("nan")
        return loss

    def _where(self, step: int) -> dict[str, Any]:
        return {"stage": self.stage.name, "step": self.stage.start_step + step, "stage_step": step}

    def _line(self, step: int) -> dict[str, Any]:
        """The start of a metrics line: the plan's step first."""
        return {"step": self.stage.start_step + step, "stage": self.stage.name, "stage_step": step}

    def _guard_acts(self, why: str, spike: bool) -> bool:
        """Skip the update, go back to a good checkpoint, or (a finite spike, `reset_moments`) let it
        go ahead clipped with fresh optimizer moments: True then. Stop when the retry budget is spent."""
        guard, control, stage = self.control.guard, self.control, self.stage
        assert guard is not None
        step = self.progress.step
        where = self._where(step + 1)
        if not (guard.action == "reset_moments" and spike and control.retries < guard.max_retries):
            self.opt.optimizer.zero_grad(set_to_none=True)
        if control.retries >= guard.max_retries:
            control.retries = 0  # a resumed run gets a new budget: resuming is the user's decision
            self.checkpoints.save(step, self.capture)
            self.run.logs.event("guard_gave_up", reason=why, retries=guard.max_retries, **where)
            raise RunStopped(f"stage '{stage.name}' stopped at update {step + 1}: {why}; the guard's "
                             f"{guard.max_retries} retries are spent. Checkpoint saved at step {step}; resume to "
                             f"try again, or change the guard or the data", code=3)
        control.retries += 1
        if guard.action == "reset_moments" and spike:
            clip = guard.reset_settings().clip
            held = self.opt.reset_moments()
            torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.run.logs.event("guard_reset_moments", reason=why, retry=control.retries, reset_parameters=held,
                                clip=clip, **where)
            self.run.view.print(f"[{stage.name}] update {step + 1}: {why}; optimizer moments reset, gradient "
                                f"clipped to {clip:g}")
            return True
        if guard.action != "rollback":  # skip, and reset_moments on a non-finite update
            self.progress.step += 1  # the update is spent: the batch is dropped, the schedule goes on
            self.run.logs.event("guard_skip", reason=why, retry=control.retries, **where)
            self.run.view.print(f"[{stage.name}] update {step + 1} skipped: {why}")
            return False
        back = guard.rollback_settings()
        target = self._go_back(max(0, step - back.steps_back), back.skip_batches, back.lr_scale)
        self.run.logs.event("guard_rollback", reason=why, retry=control.retries, to_step=stage.start_step + target,
                            to_stage_step=target, skip_batches=back.skip_batches, lr_scale=back.lr_scale, **where)
        self.run.view.print(f"[{stage.name}] update {step + 1} refused ({why}): back to step {target}, "
                            f"skipping {back.skip_batches} batches, LR x{back.lr_scale:g}")
        return False

    def _go_back(self, step: int, skip_batches: int, lr_scale: float) -> int:
        """Restore the newest valid checkpoint at or before `step`; returns its step."""
        step = self.checkpoints.go_back(step, lambda state: self.restore(state, rollback=True))
        self.control.attempt += 1
        self.control.lr_factor *= lr_scale
        self.sampler.skip(sum(self.stage.micro_batches_at(step + j) for j in range(skip_batches)))
        return step

    def _stop_nonfinite(self, why: str | None) -> None:
        """Stop the stage on a non-finite value (`why`), keeping the checkpoints saved before it."""
        if why is None:
            return
        stage, step = self.stage, self.progress.step
        good = max(self.checkpoints.steps(), default=None)
        kept = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint of it is kept"
        self.run.logs.event("nonfinite_stop", reason=why, **self._where(step))
        raise RunStopped(f"stage '{stage.name}' stopped at step {step} (plan step {stage.start_step + step}): {why}; "
                         f"nothing after it was saved and {kept}. A guard skips or rolls back such updates; "
                         "allow_nonfinite: true trains on", code=3)

    def _check_end(self) -> None:
        """A stage whose weights or validation metrics are not finite never ends (nor is cached)."""
        if self.watch is not None:
            self._stop_nonfinite(self.watch.problem())
        bad = nonfinite_metrics(self.progress.metrics)
        if not weights_finite(self.model):
            bad.insert(0, "weights")
        if bad:
            self._stop_nonfinite(f"non-finite {', '.join(bad)} at the stage's end")

    def _act(self, fired: Fired) -> str | None:
        """Carry out a rule's action; log it with the values that made it fire. Returns why the
        stage ends, if it does."""
        do, step, stage = fired.rule.do, self.progress.step, self.stage
        event = {"stage": stage.name, "step": stage.start_step + step, "stage_step": step, "rule": fired.index,
                 "when": fired.rule.when.kind, "action": do.kind, "values": fired.values}
        ended = None
        if do.lr_scale is not None:
            change = self.control.scale_lr(step, do.lr_scale.factor, do.lr_scale.min_lr)
            event.update(lr_from=change[0], lr_to=change[1]) if change else event.update(unchanged="at min_lr")
        elif do.switch is not None:
            event.update(self._switch(do.switch, step))
        elif do.next_stage is not None:
            ended = f"rule {fired.index} ({fired.rule.when.kind} -> next_stage)"
        else:
            assert do.rollback is not None and self.control.best is not None
            target = self._go_back(self.control.best["step"], do.rollback.skip_batches, do.rollback.lr_scale)
            event.update(to_step=stage.start_step + target, to_stage_step=target, best=self.control.best["value"])
        self.run.logs.event("rule_fired", **event)
        self.run.view.print(f"[{stage.name}] rule {fired.index} fired at step {step}: {fired.rule.when.kind} -> "
                            f"{do.kind} ({', '.join(f'{k} {v:.4g}' for k, v in fired.values.items())})")
        return ended

    def _switch(self, switch: Any, step: int) -> dict[str, Any]:
        """A new optimizer for the rest of the stage, at the given LR, the SWATS estimate (auto) or the
        planned one; the schedule's shape goes on from it."""
        settings = {k: v for k, v in OPTIMIZER_SETTINGS[switch.to].items() if v is not None}
        settings.update(switch.settings())
        if switch.lr == "auto":
            lr = swats_lr(self.control.swats, settings.get("momentum", 0.0), f"stages.{self.stage.name}.rules")
        else:
            lr = switch.lr if switch.lr is not None else self.control.lr(step)
        settings["lr"] = lr
        before = self.opt.name
        converted = self.opt.switch(switch.to, settings, switch.handoff)
        self.control.set_lr(step, lr)
        return {"optimizer_from": before, "optimizer_to": switch.to, "lr": lr, "handoff": switch.handoff,
                "converted_parameters": converted}

    # --- logging and evaluation -------------------------------------------------------------------------

    def _attempt(self) -> dict[str, int]:
        return {"attempt": self.control.attempt} if self.control.attempt else {}

    def _log_train(self, update: Update) -> None:
        p, stage = self.progress, self.stage
        if self.watch is None:
            p.train_loss = (p.window_loss / p.window_steps).item()
        else:  # one host sync for the window's loss and its finiteness
            p.train_loss, why = self.watch.read(p.window_loss / p.window_steps)
            self._stop_nonfinite(why)
        now = time.perf_counter()
        timed = stage.tokens_before(p.step) - stage.tokens_before(p.step - self.timed_steps)
        rate = timed / max(now - self.window_started, 1e-9)
        info = {"lr": update.lr, "loss": p.train_loss, "grad_norm": float(update.grad_norm),  # type: ignore[arg-type]
                ("tok_per_s" if self.task.unit == "tokens" else "ex_per_s"): rate}
        self.run.logs.metric("train", **self._line(p.step), **{self.task.unit: stage.start_tokens +
                                                                 stage.tokens_before(p.step)},
                             batch=stage.sequences_at(p.step - 1), **self._attempt(), **info)
        self.run.view.step(stage.name, p.step, stage.steps, stage.start_step + p.step, info)
        p.window_loss, p.window_steps = torch.zeros_like(p.window_loss), 0
        self.window_started, self.timed_steps = now, 0

    def _evaluate_and_judge(self) -> tuple[list[Fired], str | None]:
        """A mid-stage evaluation, fed to the rules and `until`; the best one kept for rollbacks."""
        p = self.progress
        metrics = self._evaluate()
        if self.strict and (bad := nonfinite_metrics(metrics)):
            self._stop_nonfinite(f"non-finite {', '.join(bad)} at the evaluation")
        p.val_loss, p.eval_step, p.metrics = metrics["val_loss"], p.step, dict(metrics)
        metrics["train_loss"] = p.train_loss if p.train_loss is not None else math.nan
        if self.run.on_eval is not None:  # e.g. a search's pruner, which may stop the run here
            self.run.on_eval(self.stage.name, p.step, dict(metrics))
        fired, end, best = self.control.after_eval(p.step, metrics)
        if best:
            self.checkpoints.save(p.step, self.capture, keep="best")
        return fired, end

    def _evaluate(self) -> dict[str, float]:
        stage, step = self.stage, self.progress.step
        limit = stage.config.eval.batches
        with contextlib.ExitStack() as weights:  # evaluated: the averaged weights, when the stage averages
            if self.average is not None:
                weights.enter_context(self.average.applied())
            if is_schedule_free(self.opt.optimizer):
                weights.enter_context(averaged(self.opt.optimizer))
            # Rank 0 evaluates the whole validation set; every rank's rules read its metrics.
            metrics = self.run.world.evaluated(
                lambda: self.task.evaluate(stage.block_size, stage.batch_size, None if limit == "all" else limit))
        self.model.train()
        logged = {k: (v if math.isfinite(v) and not (k == "val_ppl" and metrics["val_loss"] >= 50) else None)
                  for k, v in metrics.items()}  # JSON has no infinity
        self.run.logs.metric("eval", **self._line(step), **self._attempt(), **logged)
        self.run.logs.event("eval", stage=stage.name, step=stage.start_step + step, **logged)
        shown = ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in logged.items()
                          if v is not None and k != "val_loss")
        self.run.view.print(f"[{stage.name}] eval at step {step}: val loss {metrics['val_loss']:.4f}"
                            + (f", {shown}" if shown else ""))
        return metrics
