"""One stage of training (torchtitan's shape: `train` -> `train_step`). The update step reads on
one screen; what reacts to training (injected faults, the non-finite watch, the guard, SWATS,
weight averaging, the rules, a user's) are callbacks (engine.callbacks, engine.reactions) it
calls at seven points; evaluation, logging, `until: time` and gradual unfreezing are methods
around it, and all running state is on the trainer. What a checkpoint must hold to continue
exactly is `StageProgress` plus the optimizer, sampler, rules, callbacks and RNG states (`capture`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from stagewise.engine.callbacks import Callback, StepState
from stagewise.engine.checkpointer import Checkpointer
from stagewise.engine.context import RunContext
from stagewise.engine.control import StageControl
from stagewise.engine.device import derive_seed, seed_everything
from stagewise.engine.distributed import SINGLE, Replicas, World
from stagewise.engine.finite import nonfinite_metrics, weights_finite
from stagewise.engine.progress import StageSummary
from stagewise.engine.reactions import Averaging, EndOnBest, FaultInjection, Guard, NonFiniteWatch, Rules, Swats, stop_nonfinite
from stagewise.engine.rng import as_tensor, rng_bytes, rng_state, set_rng_state, set_rng_tensor
from stagewise.engine.sharded import plain
from stagewise.engine.stage_log import log_eval_line, log_train_line, stage_utilization
from stagewise.engine.stage_optimizer import StageOptimizer
from stagewise.engine.utilization import reset_peak_memory
from stagewise.optim.layers import StageLayers
from stagewise.optim.regularizers import weight_penalty
from stagewise.optim.schedule_free import averaged, is_schedule_free
from stagewise.plan.resolved import ResolvedStage
from stagewise.tasks.base import Batch, BatchSource, Task

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
        self.started = self.window_started = time.perf_counter()
        self.timed_steps = 0  # updates since window_started in this process (a resumed window began elsewhere)
        self.step_seconds = 0.0  # in train_step, in this process: what the stage's rate is measured over
        self.resumed = self.restored = False  # restored: a callback went back to a checkpoint this update
        # Without a guard (which refuses bad updates itself) a non-finite update stops the stage,
        # unless the plan allows it; the stage's end is checked either way.
        self.strict = not stage.config.allow_nonfinite
        self.watch = NonFiniteWatch(run.device) if self.strict and not self.control.checks_updates else None
        average = stage.config.average
        self.average = Averaging(self.model, average.ema) if average is not None else None
        # Vetoes first, SWATS's `before` last (just before the step); the average before the user's stage_end.
        builtin_first = [FaultInjection(), self.watch, Guard() if self.control.checks_updates else None,
                         EndOnBest() if stage.config.end == "best" else None, self.average]
        builtin_last = [Swats() if self.control.swats is not None else None, Rules()]
        self.callbacks: list[Callback] = [cb for cb in (*builtin_first, *run.callbacks, *builtin_last) if cb is not None]
        self.norm_always = any(cb.needs_grad_norm for cb in self.callbacks)

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
        first = self.progress.step
        epochs = self.stage.epochs_done(first)  # those before the update: its own end is one when it adds one
        while self.progress.step < self.stage.steps and self.progress.ended is None:
            started = time.perf_counter()
            update = self.train_step()
            self.step_seconds += time.perf_counter() - started
            if update is not None:
                self._after_update(update, epochs)
            if update is not None or self.restored:  # a dropped update's epoch end is the next update's
                epochs = self.stage.epochs_done(self.progress.step)
        used = stage_utilization(self.run, self.stage, self.model, self.task.unit, first, self.progress.step,
                                 self.step_seconds)
        p = self.progress
        if p.eval_step != p.step:  # an evaluation that ended the stage is not repeated
            p.metrics = self._evaluate()
            p.val_loss = p.metrics["val_loss"]
            self.control.judge_best(p.step, {**p.metrics, "train_loss": p.train_loss if p.train_loss is not None else math.nan})
        for cb in self.callbacks:
            cb.stage_end(self)  # `end: best`, then the average: what the final checkpoint, children and export hold
        if is_schedule_free(self.opt.optimizer):
            self.opt.optimizer.eval()  # type: ignore[attr-defined]  # likewise on its averaged weights x
        self._check_end()  # the weights and metrics the stage ends on
        summary = StageSummary(stage=self.stage.name, optimizer="merge" if self.stage.merged else self.opt.name, steps=p.step,
                               tokens=self.stage.tokens_before(p.step), seconds=time.perf_counter() - self.started,
                               train_loss=p.train_loss, val_loss=p.val_loss, unit=self.task.unit, metrics=p.metrics,
                               **(dataclasses.asdict(used) if used is not None else {}))
        return StageOutcome(summary, self.opt.optimizer, self.handoff_state())

    def train_step(self) -> StepState | None:
        """One update: LR, micro-batches, backward, penalty, clip, callbacks' veto, optimizer step.
        None when a callback (the guard) vetoed it."""
        step, control, device, callbacks = self.progress.step, self.control, self.run.device, self.callbacks
        update = StepState(step, control.lr(step))
        self.opt.set_lr(update.lr)
        for cb in callbacks:
            cb.before_step(self, update)  # fault injection: a poisoned batch, a loss factor
        update_loss = torch.zeros((), device=device)
        for (batch, share), last in with_last(micro_batches(self.sampler, self.stage, step, self.run.world, self.task.targets)):
            if update.corrupt:
                batch = self.task.corrupt(batch, step)
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            with self.replicas.syncing(last):
                loss = self.replicas.loss(batch)
                for factor in update.loss_factors:
                    loss = loss * factor
                (loss * share).backward()  # shares sum to 1: the gradient of the update's mean loss
            update_loss += loss.detach() * share
        update.loss = self.run.world.mean(update_loss)  # every rank's guards and logs read the same loss
        penalty = weight_penalty(self.model, self.opt.loss_l1, self.reg.l2)
        if penalty is not None:
            penalty.backward()
        if self.reg.grad_clip is not None or self._logging(step + 1) or self.norm_always:
            # what clip_grad_norm_ does, with the norm of sharded gradients made one tensor first
            update.grad_norm = plain(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
            if self.reg.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.reg.grad_clip, update.grad_norm)
        # Callbacks look before the optimizer steps: a vetoed update never reaches the weights.
        self.restored = False
        if any(cb.before_optimizer_step(self, update) is False for cb in callbacks):
            self.opt.optimizer.zero_grad(set_to_none=True)
            if not self.restored:  # spent: the batch is dropped, the schedule goes on (a rollback moved back)
                self.progress.step += 1
            return None
        self.opt.optimizer.step()
        self.progress.window_loss += update.loss
        return update

    def _after_update(self, update: StepState, epochs: int) -> None:
        """Count the update, unfreeze, log it, let the callbacks act on it; evaluate; then checkpoint.
        `epochs`: the stage's epochs done before it (ResolvedStage.epochs_done)."""
        p, stage = self.progress, self.stage
        p.step, p.window_steps, self.timed_steps = p.step + 1, p.window_steps + 1, self.timed_steps + 1
        new_epoch = stage.epochs_done(p.step) != epochs
        if new_epoch and self.layers.gradual:
            self.layers.apply(stage.epochs_done(p.step))  # one more layer group from the next update on
        if self._logging(p.step):
            self._log_train(update)
        every = stage.config.eval.every is not None and p.step % stage.config.eval.every == 0
        update.evaluates = (every or (new_epoch and stage.config.eval.each_epoch)) and p.step < stage.steps
        stepped = self.opt.optimizer  # the gradients it applied go, even when a rule switches it
        for cb in self.callbacks:
            cb.after_update(self, update)  # SWATS's estimate, the average, a SWATS rule
        stepped.zero_grad(set_to_none=True)
        ended = update.end
        if self.control.time_is_up(time.perf_counter() - self.started, self.run.world):
            ended = f"time budget of {self.control.until.time.minutes:g} min spent"  # type: ignore[union-attr]
        if update.evaluates:
            metrics = self._evaluate_mid()
            for cb in self.callbacks:  # a search's pruner, the rules and `until`
                reason = cb.after_evaluation(self, dict(metrics))
                ended = ended or reason
        if ended is not None:
            p.ended = ended
            self.run.logs.event("stage_stopped_early", stage=stage.name, step=stage.start_step + p.step,
                                stage_step=p.step, reason=ended)
            self.run.view.print(f"[{stage.name}] ends early at step {p.step}: {ended}")
        self.checkpoints(p.step, self.capture)

    def _logging(self, stage_step: int) -> bool:
        return stage_step % self.run.plan.log.every == 0 or stage_step == self.stage.steps

    # --- start, state ---------------------------------------------------------------------------------

    def _begin(self, lr_factor: float | None) -> None:
        stage, p = self.stage, self.progress
        if self.resumed:
            if self.control.rollbacks:  # the roles of the checkpoints a rollback may go back to
                self.checkpoints.keep("start", 0)
            if self.control.best is not None:
                self.checkpoints.keep("best", self.control.best["step"])
        elif lr_factor is not None:
            self.control.lr_factor = lr_factor
        self.layers.apply(self.stage.epochs_done(self.progress.step))
        self.model.train()
        reset_peak_memory(self.run.device)
        self.run.logs.event("stage_start", stage=stage.name, parent=stage.parent, step=stage.start_step + p.step,
                            stage_step=p.step, steps=stage.steps, optimizer=stage.trains_with,
                            settings={} if stage.merged else self._settings(),
                            schedule=stage.config.schedule.name, task=self.task.kind,
                            block_size=stage.block_size, tokens_per_step=stage.tokens_per_step, unit=self.task.unit,
                            dropout=sorted(self.run.dropout_of(self.model).rates()), key=stage.key)
        self.run.view.stage_start(stage.name, stage.steps, at=p.step)
        for cb in self.callbacks:
            cb.stage_start(self)
        if self.control.rollbacks and p.step == 0:
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
            why = self.watch.watch.problem() if self.watch is not None else None
            stop_nonfinite(self, why or (None if weights_finite(self.model) else "non-finite weights"))
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.progress.step)
        states = {cb.key: state for cb in self.callbacks if (state := cb.state_dict())}
        return {**self.handoff_state(), "sampler": self.sampler.state_dict(), "progress": self.progress.state_dict(),
                "rng": rng_state(), "control": self.control.state_dict(time.perf_counter() - self.started),
                "average": self.average.ema.state_dict() if self.average is not None else None,
                "world_size": self.run.world.size, **({"callbacks": states} if states else {}),
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
            self.average.ema.load_state_dict(state["average"])
        if not rollback:  # a rollback keeps what the callbacks learnt, as it keeps the rules' memory
            states = state.get("callbacks", {})
            for cb in self.callbacks:
                if cb.key in states:
                    cb.load_state_dict(states[cb.key])
        self.layers.apply(self.stage.epochs_done(self.progress.step))

    # --- reacting -------------------------------------------------------------------------------------

    def where(self, step: int) -> dict[str, Any]:
        return {"stage": self.stage.name, "step": self.stage.start_step + step, "stage_step": step}

    def go_back(self, step: int, skip_batches: int, lr_scale: float) -> int:
        """Restore the newest valid checkpoint at or before `step`; returns its step."""
        step = self.checkpoints.go_back(step, lambda state: self.restore(state, rollback=True))
        self.restored = True
        self.control.attempt += 1
        self.control.lr_factor *= lr_scale
        self.sampler.skip(sum(self.stage.micro_batches_at(step + j) for j in range(skip_batches)))
        return step

    def _check_end(self) -> None:
        """A stage whose weights or validation metrics are not finite never ends (nor is cached)."""
        if self.watch is not None:
            stop_nonfinite(self, self.watch.watch.problem())
        bad = nonfinite_metrics(self.progress.metrics)
        if not weights_finite(self.model):
            bad.insert(0, "weights")
        if bad:
            stop_nonfinite(self, f"non-finite {', '.join(bad)} at the stage's end")

    # --- logging and evaluation -------------------------------------------------------------------------

    def _log_train(self, update: StepState) -> None:
        p = self.progress
        if self.watch is None:
            p.train_loss = (p.window_loss / p.window_steps).item()
        else:  # one host sync for the window's loss and its finiteness
            p.train_loss, why = self.watch.watch.read(p.window_loss / p.window_steps)
            stop_nonfinite(self, why)
        now = time.perf_counter()
        log_train_line(self.run, self.stage, self.task.unit, p.step, self.control.attempt, update.lr, p.train_loss,
                       float(update.grad_norm), self.timed_steps, now - self.window_started)  # type: ignore[arg-type]
        p.window_loss, p.window_steps = torch.zeros_like(p.window_loss), 0
        self.window_started, self.timed_steps = now, 0

    def _evaluate_mid(self) -> dict[str, float]:
        """A mid-stage evaluation; its metrics with the train loss, for the callbacks (rules, `until`)."""
        p = self.progress
        metrics = self._evaluate()
        if self.strict and (bad := nonfinite_metrics(metrics)):
            stop_nonfinite(self, f"non-finite {', '.join(bad)} at the evaluation")
        p.val_loss, p.eval_step, p.metrics = metrics["val_loss"], p.step, dict(metrics)
        return {**metrics, "train_loss": p.train_loss if p.train_loss is not None else math.nan}

    def _evaluate(self) -> dict[str, float]:
        stage, step = self.stage, self.progress.step
        limit = stage.config.eval.batches
        with contextlib.ExitStack() as weights:  # evaluated: the averaged weights, when the stage averages
            if self.average is not None:
                weights.enter_context(self.average.ema.applied())
            if is_schedule_free(self.opt.optimizer):
                weights.enter_context(averaged(self.opt.optimizer))
            # Rank 0 evaluates the whole validation set; every rank's rules read its metrics.
            metrics = self.run.world.evaluated(
                lambda: self.task.evaluate(stage.block_size, stage.batch_size, None if limit == "all" else limit))
        self.model.train()
        log_eval_line(self.run, stage, step, self.control.attempt, metrics)
        return metrics
