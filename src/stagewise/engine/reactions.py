"""The plan's reactions to training as built-in callbacks (engine.callbacks): injected faults,
the non-finite watch, the guard, SWATS's estimate, weight averaging and the rules, plus the
evaluation hook a search's pruner listens on. What they remember lives in the stage's
StageControl (rules, guard, faults, SWATS: its memory survives a rollback, its trajectory goes
back with the weights) and in the averaging's own state, saved where checkpoints always held it
("control", "swats", "average"), so their `state_dict` is empty."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from stagewise.config.optimizer_config import OPTIMIZER_SETTINGS
from stagewise.engine.callbacks import Callback, StepState
from stagewise.engine.control import Fired
from stagewise.engine.finite import FiniteWatch
from stagewise.errors import RunStopped
from stagewise.optim.average import WeightEMA
from stagewise.optim.swats import swats_lr

if TYPE_CHECKING:
    from stagewise.engine.loop import StageTrainer

# (stage name, stage step, metrics) after each mid-stage evaluation; it may raise to stop the run.
EvalHook = Callable[[str, int, dict[str, float]], None]


def stop_nonfinite(trainer: StageTrainer, why: str | None) -> None:
    """Stop the stage on a non-finite value (`why`), keeping the checkpoints saved before it."""
    if why is None:
        return
    stage, step = trainer.stage, trainer.progress.step
    good = max(trainer.checkpoints.steps(), default=None)
    kept = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint of it is kept"
    trainer.run.logs.event("nonfinite_stop", reason=why, **trainer.where(step))
    raise RunStopped(f"stage '{stage.name}' stopped at step {step} (plan step {stage.start_step + step}): {why}; "
                     f"nothing after it was saved and {kept}. A guard skips or rolls back such updates; "
                     "allow_nonfinite: true trains on", code=3)


class FaultInjection(Callback):
    """The plan's `inject`: a poisoned batch, or the loss multiplied (a spike, NaN), to test guards for real."""

    def before_step(self, trainer: StageTrainer, update: StepState) -> None:
        control, step = trainer.control, update.step
        update.corrupt = control.corrupts(step, trainer.sampler.state_dict)
        if (factor := control.fault(step, "loss_spike")) is not None:
            update.loss_factors.append(factor)
        if control.fault(step, "nan") is not None:
            update.loss_factors.append(float("nan"))


class NonFiniteWatch(Callback):
    """Without a guard: each update's loss and gradient norm noted on the device, no host sync
    (engine.finite); the trainer reads it at log lines and checkpoints."""

    def __init__(self, device: torch.device) -> None:
        self.watch = FiniteWatch(device)

    def before_optimizer_step(self, trainer: StageTrainer, update: StepState) -> bool | None:
        assert update.loss is not None
        self.watch.note(update.step + 1, update.loss, update.grad_norm)
        return None


class Guard(Callback):
    """The plan's `guard`: looks at every update before the optimizer steps, so a bad one never
    reaches the weights. Skip it, go back to a good checkpoint, or (a finite spike,
    `reset_moments`) let it go ahead clipped with fresh optimizer moments. Stops the run when the
    retry budget is spent."""

    needs_grad_norm = True

    def before_optimizer_step(self, trainer: StageTrainer, update: StepState) -> bool | None:
        assert update.loss is not None and update.grad_norm is not None
        loss, norm = update.loss.item(), float(update.grad_norm)
        why = trainer.control.check_update(update.step, loss, norm)
        if why is None:
            return None
        return self._act(trainer, why, spike=math.isfinite(loss) and math.isfinite(norm))

    def _act(self, trainer: StageTrainer, why: str, spike: bool) -> bool:
        control, stage, step = trainer.control, trainer.stage, trainer.progress.step
        guard = control.guard
        assert guard is not None
        where = trainer.where(step + 1)
        if not (guard.action == "reset_moments" and spike and control.retries < guard.max_retries):
            trainer.opt.optimizer.zero_grad(set_to_none=True)
        if control.retries >= guard.max_retries:
            control.retries = 0  # a resumed run gets a new budget: resuming is the user's decision
            trainer.checkpoints.save(step, trainer.capture)
            trainer.run.logs.event("guard_gave_up", reason=why, retries=guard.max_retries, **where)
            raise RunStopped(f"stage '{stage.name}' stopped at update {step + 1}: {why}; the guard's "
                             f"{guard.max_retries} retries are spent. Checkpoint saved at step {step}; resume to "
                             f"try again, or change the guard or the data", code=3)
        control.retries += 1
        if guard.action == "reset_moments" and spike:
            clip = guard.reset_settings().clip
            held = trainer.opt.reset_moments()
            torch.nn.utils.clip_grad_norm_(trainer.params, clip)
            trainer.run.logs.event("guard_reset_moments", reason=why, retry=control.retries, reset_parameters=held,
                                   clip=clip, **where)
            trainer.run.view.print(f"[{stage.name}] update {step + 1}: {why}; optimizer moments reset, gradient "
                                   f"clipped to {clip:g}")
            return True
        if guard.action != "rollback":  # skip, and reset_moments on a non-finite update: the trainer counts it
            trainer.run.logs.event("guard_skip", reason=why, retry=control.retries, **where)
            trainer.run.view.print(f"[{stage.name}] update {step + 1} skipped: {why}")
            return False
        back = guard.rollback_settings()
        target = trainer.go_back(max(0, step - back.steps_back), back.skip_batches, back.lr_scale)
        trainer.run.logs.event("guard_rollback", reason=why, retry=control.retries, to_step=stage.start_step + target,
                               to_stage_step=target, skip_batches=back.skip_batches, lr_scale=back.lr_scale, **where)
        trainer.run.view.print(f"[{stage.name}] update {step + 1} refused ({why}): back to step {target}, "
                               f"skipping {back.skip_batches} batches, LR x{back.lr_scale:g}")
        return False


class EndOnBest(Callback):
    """`end: best`: the model and optimizer go back to the best evaluation's checkpoint, so the
    final checkpoint, the children and the export all hold those weights."""

    def stage_end(self, trainer: StageTrainer) -> None:
        best, p = trainer.control.best, trainer.progress
        assert best is not None  # resolve requires evaluations during the stage
        if best["step"] != p.step:
            def take(state: dict[str, Any]) -> None:
                trainer.opt.load_state_dict(state)
                if trainer.average is not None:
                    trainer.average.ema.load_state_dict(state["average"])

            trainer.checkpoints.load(best["step"], take)
            p.metrics = {k: v for k, v in best["metrics"].items() if k != "train_loss"}
            p.val_loss = p.metrics["val_loss"]
        trainer.run.logs.event("stage_end_best", **trainer.where(best["step"]), metric=best["metric"],
                               value=best["value"], last_step=trainer.stage.start_step + p.step)
        trainer.run.view.print(f"[{trainer.stage.name}] ends on its best evaluation: step {best['step']} "
                               f"({best['metric']} {best['value']:.4f})")


class Swats(Callback):
    """SWATS's estimate of the SGD LR that matches Adam's steps, from each Adam update (only
    Adam's steps estimate it: it stops once a rule switches away)."""

    def before_optimizer_step(self, trainer: StageTrainer, update: StepState) -> bool | None:
        if trainer.opt.follows_adam:
            assert trainer.control.swats is not None
            trainer.control.swats.before(trainer.params)
        return None

    def after_update(self, trainer: StageTrainer, update: StepState) -> None:
        if trainer.opt.follows_adam:
            assert trainer.control.swats is not None
            trainer.control.swats.after(trainer.params)


class Averaging(Callback):
    """The stage's `average.ema`: an EMA of the weights after every applied update; the stage
    evaluates with it swapped in (the trainer) and ends on it."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.ema = WeightEMA(model, decay)  # from the stage's first weights

    def after_update(self, trainer: StageTrainer, update: StepState) -> None:
        self.ema.update()

    def stage_end(self, trainer: StageTrainer) -> None:
        self.ema.copy_to_model()  # the final checkpoint, the children and the export hold the average


class EvalReporter(Callback):
    """Calls `hook(stage, step, metrics)` after each mid-stage evaluation: a search's pruner,
    which may stop the run there."""

    def __init__(self, hook: EvalHook) -> None:
        self.hook = hook

    def after_evaluation(self, trainer: StageTrainer, metrics: dict[str, float]) -> str | None:
        self.hook(trainer.stage.name, trainer.progress.step, dict(metrics))
        return None


class Rules(Callback):
    """The stage's `rules` and `until` (decided by StageControl) carried out, in the order they
    fired: a SWATS rule after an Adam update, the others after an evaluation (a SWATS rule that
    fires at an evaluating update waits for it); the best evaluation kept for rollbacks."""

    def __init__(self) -> None:
        self.pending: list[Fired] = []  # fired at this update, acted on after its evaluation

    def after_update(self, trainer: StageTrainer, update: StepState) -> None:
        self.pending = trainer.control.after_update(trainer.opt.follows_adam)
        if not update.evaluates:
            for fired in self.pending:  # each acts, whether or not an earlier one ends the stage
                stop = self.act(trainer, fired)
                update.end = update.end or stop
            self.pending = []

    def after_evaluation(self, trainer: StageTrainer, metrics: dict[str, float]) -> str | None:
        step = trainer.progress.step
        fired, end, best = trainer.control.after_eval(step, metrics)
        if best:
            trainer.checkpoints.save(step, trainer.capture, keep="best")
        for rule in [*self.pending, *fired]:
            stop = self.act(trainer, rule)
            end = end or stop
        self.pending = []
        return end

    def act(self, trainer: StageTrainer, fired: Fired) -> str | None:
        """Carry out a rule's action; log it with the values that made it fire. Returns why the
        stage ends, if it does."""
        do, step, stage = fired.rule.do, trainer.progress.step, trainer.stage
        event: dict[str, Any] = {"stage": stage.name, "step": stage.start_step + step, "stage_step": step,
                                 "rule": fired.index, "when": fired.rule.when.kind, "action": do.kind,
                                 "values": fired.values}
        ended = None
        if do.lr_scale is not None:
            change = trainer.control.scale_lr(step, do.lr_scale.factor, do.lr_scale.min_lr)
            event.update(lr_from=change[0], lr_to=change[1]) if change else event.update(unchanged="at min_lr")
        elif do.switch is not None:
            event.update(self._switch(trainer, do.switch, step))
        elif do.next_stage is not None:
            ended = f"rule {fired.index} ({fired.rule.when.kind} -> next_stage)"
        else:
            assert do.rollback is not None and trainer.control.best is not None
            target = trainer.go_back(trainer.control.best["step"], do.rollback.skip_batches, do.rollback.lr_scale)
            event.update(to_step=stage.start_step + target, to_stage_step=target, best=trainer.control.best["value"])
        trainer.run.logs.event("rule_fired", **event)
        trainer.run.view.print(f"[{stage.name}] rule {fired.index} fired at step {step}: {fired.rule.when.kind} -> "
                               f"{do.kind} ({', '.join(f'{k} {v:.4g}' for k, v in fired.values.items())})")
        return ended

    def _switch(self, trainer: StageTrainer, switch: Any, step: int) -> dict[str, Any]:
        """A new optimizer for the rest of the stage, at the given LR, the SWATS estimate (auto) or the
        planned one; the schedule's shape goes on from it."""
        settings = {k: v for k, v in OPTIMIZER_SETTINGS[switch.to].items() if v is not None}
        settings.update(switch.settings())
        if switch.lr == "auto":
            lr = swats_lr(trainer.control.swats, settings.get("momentum", 0.0), f"stages.{trainer.stage.name}.rules")
        else:
            lr = switch.lr if switch.lr is not None else trainer.control.lr(step)
        settings["lr"] = lr
        before = trainer.opt.name
        converted = trainer.opt.switch(switch.to, settings, switch.handoff)
        trainer.control.set_lr(step, lr)
        return {"optimizer_from": before, "optimizer_to": switch.to, "lr": lr, "handoff": switch.handoff,
                "converted_parameters": converted}
