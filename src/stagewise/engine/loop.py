"""One stage of training: the step loop, evaluation and logging. The step reads on one screen;
what a checkpoint must hold to continue it exactly is `StageProgress` plus the sampler, optimizer
and RNG states."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from stagewise.data.sampler import WindowSampler
from stagewise.engine.context import RunContext
from stagewise.engine.device import derive_seed, seed_everything
from stagewise.engine.rng import rng_state, set_rng_state
from stagewise.optim.regularizers import weight_penalty
from stagewise.plan.resolve import ResolvedStage
from stagewise.track.progress import StageSummary

# Called after every update with the step count and a function that captures the full state; it
# saves a checkpoint when one is due and may stop the run (engine.run.Checkpointer).
AfterStep = Callable[[int, Callable[[], dict[str, Any]]], None]


def lm_loss(run: RunContext, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch; x, y: (B, T)."""
    # No KV cache: nothing reads it here, and a compiled forward would return it as extra outputs.
    no_cache = {"use_cache": False} if getattr(run.model.config, "use_cache", False) else {}
    with run.autocast():
        logits = run.forward(input_ids=x, **no_cache).logits  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


@torch.no_grad()
def evaluate(run: RunContext, stage: ResolvedStage) -> float:
    """Token-weighted mean loss over the same validation batches every time."""
    limit = stage.config.eval.batches
    val = WindowSampler(run.data.val, stage.block_size, stage.batch_size, seed=0, shuffle=False)
    run.model.eval()
    total, count = torch.zeros((), device=run.device), 0
    for x, y in val.iter_eval(None if limit == "all" else limit):
        x, y = x.to(run.device), y.to(run.device)
        total += lm_loss(run, x, y) * y.numel()
        count += y.numel()
    run.model.train()
    return (total / count).item()


def _micro_batches(sampler: WindowSampler, stage: ResolvedStage) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """The micro-batches of one update with each one's share of the update's gradient."""
    if stage.full_batch:  # one update per pass: the rest of the epoch, weighted by rows
        for x, y in sampler.epoch_batches():
            yield x, y, x.size(0) / stage.windows_per_epoch
    else:
        for _ in range(stage.micro_batches):
            x, y = sampler.next_batch()
            yield x, y, 1.0 / stage.micro_batches


@dataclass
class StageProgress:
    """The loop's own running state. The loss sum between two log lines stays on the device so
    the step never waits for it; it is saved so a resumed run logs the same numbers."""

    step: int = 0  # updates done in this stage
    window_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    window_steps: int = 0
    train_loss: float | None = None
    val_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "window_loss": self.window_loss.detach().cpu(), "window_steps": self.window_steps,
                "train_loss": self.train_loss, "val_loss": self.val_loss}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.step, self.window_steps = state["step"], state["window_steps"]
        self.window_loss = state["window_loss"].to(device)
        self.train_loss, self.val_loss = state["train_loss"], state["val_loss"]


def train_stage(run: RunContext, stage: ResolvedStage, optimizer: torch.optim.Optimizer,
                after_step: AfterStep, resume: dict[str, Any] | None = None) -> StageSummary:
    cfg = stage.config
    reg = cfg.regularization
    run.dropout.set(reg.dropout)
    seed_everything(derive_seed(run.plan.seed, stage.name))
    sampler = WindowSampler(run.data.train, stage.block_size, stage.batch_size,
                            seed=derive_seed(run.plan.seed, stage.name, "data"))
    progress = StageProgress(window_loss=torch.zeros((), device=run.device))
    if resume is not None:  # everything the steps so far changed, restored exactly
        optimizer.load_state_dict(resume["optimizer"])
        sampler.load_state_dict(resume["sampler"])
        progress.load_state_dict(resume["progress"], run.device)
        set_rng_state(resume["rng"])
    l1 = 0.0 if stage.optimizer == "sgd_l1" else reg.l1  # sgd_l1 applies L1 by its proximal step
    params = [p for p in run.model.parameters() if p.requires_grad]
    log_every = run.plan.log.every
    run.model.train()
    run.logs.event("stage_start", stage=stage.name, parent=stage.parent, step=stage.start_step + progress.step,
                   stage_step=progress.step, steps=stage.steps, optimizer=stage.optimizer,
                   settings=stage.optimizer_settings, schedule=stage.config.schedule.name,
                   block_size=stage.block_size, tokens_per_step=stage.tokens_per_step,
                   dropout=sorted(run.dropout.rates()), key=stage.key)
    run.view.stage_start(stage.name, stage.steps)
    started = window_started = time.perf_counter()
    timed_steps = 0  # updates since window_started in this process (a resumed window began elsewhere)

    def capture() -> dict[str, Any]:
        return {"optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                "progress": progress.state_dict(), "rng": rng_state()}

    for step in range(progress.step, stage.steps):
        lr = stage.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        epoch = sampler.epoch
        for x, y, share in _micro_batches(sampler, stage):
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            loss = lm_loss(run, x, y)
            (loss * share).backward()  # shares sum to 1: the gradient of the update's mean loss
            progress.window_loss += loss.detach() * share
        penalty = weight_penalty(run.model, l1, reg.l2)
        if penalty is not None:
            penalty.backward()
        logging = (step + 1) % log_every == 0 or step + 1 == stage.steps
        grad_norm = None
        if reg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, reg.grad_clip)
        elif logging:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step, progress.window_steps, timed_steps = step + 1, progress.window_steps + 1, timed_steps + 1

        global_step = stage.start_step + step + 1
        if logging:
            progress.train_loss = (progress.window_loss / progress.window_steps).item()
            now = time.perf_counter()
            tok_s = timed_steps * stage.tokens_per_step / max(now - window_started, 1e-9)
            info = {"lr": lr, "loss": progress.train_loss, "grad_norm": float(grad_norm), "tok_per_s": tok_s}
            run.logs.metric("train", step=global_step, stage=stage.name, stage_step=step + 1,
                            tokens=stage.start_tokens + (step + 1) * stage.tokens_per_step, **info)
            run.view.step(stage.name, step + 1, stage.steps, global_step, info)
            progress.window_loss, progress.window_steps = torch.zeros_like(progress.window_loss), 0
            window_started, timed_steps = now, 0
        every = cfg.eval.every is not None and (step + 1) % cfg.eval.every == 0
        if (every or (sampler.epoch != epoch and cfg.eval.each_epoch)) and step + 1 < stage.steps:
            progress.val_loss = _log_eval(run, stage, global_step, step + 1)
        after_step(step + 1, capture)
    progress.val_loss = _log_eval(run, stage, stage.start_step + stage.steps, stage.steps)
    return StageSummary(stage=stage.name, optimizer=stage.optimizer, steps=stage.steps,
                        tokens=stage.steps * stage.tokens_per_step, seconds=time.perf_counter() - started,
                        train_loss=progress.train_loss, val_loss=progress.val_loss)


def _log_eval(run: RunContext, stage: ResolvedStage, global_step: int, stage_step: int) -> float:
    val_loss = evaluate(run, stage)
    ppl = math.exp(val_loss) if val_loss < 50 else None  # JSON has no infinity
    run.logs.metric("eval", step=global_step, stage=stage.name, stage_step=stage_step,
                    val_loss=val_loss, val_ppl=ppl)
    run.logs.event("eval", stage=stage.name, step=global_step, val_loss=val_loss)
    run.view.print(f"[{stage.name}] eval at step {stage_step}: val loss {val_loss:.4f}"
                   + (f", ppl {ppl:.2f}" if ppl is not None else ""))
    return val_loss
