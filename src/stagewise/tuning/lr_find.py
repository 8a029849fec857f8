"""`stagewise lr-find`: Leslie Smith's LR range test as fastai's `lr_find` runs it. From the
stage's starting weights (its parent's trained ones, trained first through the stage cache when
not there yet: the plan's prefix is a plan of its own), with the stage's optimizer, batches and
task, the LR grows exponentially from `start` to `end` over `steps` updates; the loss is smoothed
(an exponential average, beta 0.98, bias-corrected) and the sweep stops once it exceeds 4x its
minimum. Suggestions: the LR of the steepest descent of the smoothed loss against log LR, and the
LR of its minimum / 10. The model and optimizer are restored afterwards and nothing is written to
the stage cache by the sweep itself."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from stagewise.engine.context import RunContext
from stagewise.engine.device import autocast_factory, derive_seed, resolve_device, seed_everything
from stagewise.engine.loop import micro_batches
from stagewise.engine.parent import load_parent
from stagewise.engine.prepare_run import Prepared, Stage, prepare
from stagewise.engine.progress import ProgressView
from stagewise.engine.rng import rng_state, set_rng_state
from stagewise.engine.run_logs import RunLogs
from stagewise.engine.run_plan import train
from stagewise.engine.stage_optimizer import HeldState, StageOptimizer
from stagewise.engine.status import complete
from stagewise.errors import UserError
from stagewise.optim.regularizers import weight_penalty
from stagewise.plan.load import apply_override, read_yaml, validate_plan
from stagewise.plan.relocate import relocated
from stagewise.plan.rewrite import rewritten
from stagewise.plan.tree import StageNode, stage_tree
from stagewise.tasks.base import Task
from stagewise.tasks.user_task import UserParts
from stagewise.tuning.space import set_key

BETA = 0.98  # fastai's smoothing of the loss
DIVERGED = 4.0  # the sweep stops once the smoothed loss exceeds this many times its minimum
# A sweep whose smoothed loss falls less than this share of its start before its minimum has no
# descent to read an LR from (a range below where the stage learns, or a loss that does not move):
# its "steepest" point would be noise. A sweep from an untrained model falls 5-40%; a stage
# continuing a trained parent, ~1%; a range far below where the stage learns, ~0.2%.
MIN_FALL = 0.005


@dataclass(frozen=True)
class LrFindResult:
    stage: str
    lrs: list[float]
    losses: list[float]  # smoothed
    raw_losses: list[float]
    stopped: str  # why the sweep ended
    steep: float | None  # the LR of the steepest descent
    minimum: float | None  # the LR of the minimum, / 10
    plot: Path
    written: Path | None  # the plan with the suggestion (--write)
    flat: str | None = None  # why there is no suggestion: the curve has no usable descent


def lr_find(plan_path: Path, overrides: list[str], stage_name: str, *, start: float = 1e-7, end: float = 10.0,
            steps: int = 100, out: Path | None = None, cache: Path | None = None, write: Path | None = None,
            suggestion: str = "minimum", console: Console | None = None,
            raw: dict[str, Any] | None = None, parts: UserParts | None = None) -> LrFindResult:
    """The range test of stage `stage_name`; `write`: a copy of the plan with the stage's LR set to
    the `suggestion` (minimum: the minimum's LR / 10; steep: the steepest descent's LR). `raw`:
    the plan as read, overrides applied (stagewise.Plan), in place of reading `plan_path`.
    `parts`: a Python caller's model, rows and loss; a model object ends with the weights it was
    given (the stages it starts from are trained on it, then the test, then they are put back)."""
    model = parts.model if parts is not None else None
    given = {k: v.detach().clone() for k, v in model.state_dict().items()} if model is not None else None
    try:
        return _lr_find(plan_path, overrides, stage_name, start, end, steps, out, cache, write, suggestion,
                        console or Console(), raw, parts)
    finally:
        if model is not None and given is not None:
            model.load_state_dict(given)


def _lr_find(plan_path: Path, overrides: list[str], stage_name: str, start: float, end: float, steps: int,
             out: Path | None, cache: Path | None, write: Path | None, suggestion: str, console: Console,
             raw: dict[str, Any] | None, parts: UserParts | None) -> LrFindResult:
    if not 0 < start < end:
        raise UserError("--start/--end", f"need 0 < start < end (got {start:g}, {end:g})")
    if steps < 10:
        raise UserError("--steps", f"a range test needs >= 10 updates (got {steps})")
    if write is not None and write.exists():
        raise UserError(str(write), "exists: lr-find writes a new plan, never over a file")
    if raw is None:
        raw = read_yaml(plan_path)
        for item in overrides:
            apply_override(raw, item)
    plan = validate_plan(raw, where=str(plan_path))
    nodes = stage_tree(plan)
    node = next((n for n in nodes if n.name == stage_name), None)
    if node is None:
        raise UserError("--stage", f"no stage '{stage_name}' (stages: {', '.join(n.name for n in nodes)})")
    if node.config.merge is not None:
        raise UserError("--stage", f"stage '{stage_name}' merges checkpoints: it has no LR to find")
    out = out or Path("runs") / f"{plan.name}-lr-find"
    cache = cache or out.parent / ".cache"
    chain = _ancestors(node)
    # The stage and what it starts from, as a plan: the same stage keys as in the whole plan.
    names = [n.name for n in chain + [node]]
    prepared = prepare(validate_plan(_sub_plan(raw, chain + [node]), str(plan_path)), plan_path, cache,
                       parts.for_stages(names) if parts is not None else None)
    stage = prepared.stages[-1]
    if stage.parent is not None:
        _train_parent(raw, chain, node, prepared, stage, plan_path, cache, out, console,
                      parts.for_stages(names[:-1]) if parts is not None else None)

    run_dir = out / stage_name
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(plan.device)
    autocast = autocast_factory(device, prepared.dtype)
    for model in {id(s.model): s.model for s in prepared.stages}.values():
        model.to(device)
    run = RunContext(plan=prepared.plan, run_dir=run_dir, device=device, autocast=autocast, logs=RunLogs(run_dir),
                     view=ProgressView(steps, console))
    try:
        held = HeldState()
        # as the stage would start: the parent's weights (and a new head's backbone)
        load_parent(run, prepared, stage, stage.resolved.start_step, held)
        cfg = stage.resolved.config
        task = stage.spec.bind(stage.setup, cfg, cfg.data or plan.data, device, autocast, prepared.compiled)
        optimizer = StageOptimizer(stage.resolved, task.model, stage.layers)
        optimizer.hand_off(held, run.logs)  # the optimizer state it starts with (carry, convert, reset)
        lrs, smooth, losses, stopped = restored_sweep(run, stage, task, optimizer, start, end, steps)
        steep, minimum = suggestions(lrs, smooth)
        _, window = read_window(lrs, smooth)
        flat = None if len(window) < 2 or fall(window) >= MIN_FALL else (
            f"no usable descent: the smoothed loss fell {fall(window):.1%} before its minimum (a suggestion "
            f"needs {MIN_FALL:.1%}); sweep a range that reaches where the stage learns (--start/--end)")
        run.logs.event("lr_find", stage=stage_name, start=start, end=end, steps=len(lrs), stopped=stopped,
                       steep=steep, minimum=minimum)
    finally:
        run.view.close()
        run.logs.close()
    plot = run_dir / "lr_find.png"
    _plot(lrs, smooth, losses, steep, minimum, stage_name, plot)
    written = None
    chosen = minimum if suggestion == "minimum" else steep
    if write is not None and chosen is not None:
        _write_plan(raw, plan_path, node.index, chosen, write)
        written = write
    found = LrFindResult(stage_name, lrs, smooth, losses, stopped, steep, minimum, plot, written, flat)
    (run_dir / "lr_find.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                      for k, v in asdict(found).items()}, indent=1))
    return found


def _write_plan(raw: dict[str, Any], plan_path: Path, index: int, lr: float, write: Path) -> None:
    """The plan with the stage's LR set, in the plan file's own layout and comments, its relative
    paths naming the same files from where it is written."""
    planned = copy.deepcopy(raw)
    set_key(planned, f"stages.{index}.optimizer.lr", lr)
    planned = relocated(planned, plan_path.parent, write.parent)
    validate_plan(planned, where=str(write))
    try:
        text = plan_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # a plan built in Python: no layout to keep
        text = ""
    write.write_text(rewritten(text, planned), encoding="utf-8")


def _ancestors(node: StageNode) -> list[StageNode]:
    chain = []
    parent = node.parent
    while parent is not None:
        chain.append(parent)
        parent = parent.parent
    return chain[::-1]


def _sub_plan(raw: dict[str, Any], nodes: list[StageNode]) -> dict[str, Any]:
    """The raw plan with only these stages (and no sample at the end)."""
    sub = {k: copy.deepcopy(v) for k, v in raw.items() if k not in ("stages", "sample")}
    sub["stages"] = [copy.deepcopy(raw["stages"][n.index]) for n in nodes]
    return sub


def _train_parent(raw: dict[str, Any], chain: list[StageNode], node: StageNode, prepared: Prepared, stage: Stage,
                  plan_path: Path, cache: Path, out: Path, console: Console, parts: UserParts | None) -> None:
    """The parent's trained state in the stage cache: trained now (the plan's prefix, as a plan)
    unless there already. A branch from a step (`from: NAME@STEP`) needs that checkpoint, which
    only the whole plan keeps."""
    assert stage.parent is not None
    store = prepared.store(stage.parent)
    at = stage.resolved.parent_step
    if at is not None:
        if at not in store.steps():
            raise UserError(f"{plan_path}: {node.where}.from", f"lr-find starts from '{stage.parent.name}' at step "
                                                               f"{at}, which the stage cache does not hold yet: train "
                                                               f"the plan first (stagewise train {plan_path})")
        return
    if complete(store, set()):
        return
    prefix = prepare(validate_plan(_sub_plan(raw, chain), str(plan_path)), plan_path, cache, parts)
    assert [s.key for s in prefix.stages] == [s.key for s in prepared.stages[:-1]], "the prefix's stages differ"
    console.print(f"training what stage '{stage.name}' starts from: {', '.join(s.name for s in prefix.stages)}")
    train(prefix, out / "prefix", console=console)


def restored_sweep(run: RunContext, stage: Stage, task: Task, optimizer: StageOptimizer, start: float, end: float,
                    steps: int) -> tuple[list[float], list[float], list[float], str]:
    """The sweep, with the model's weights, the optimizer's state and every RNG put back after."""
    model = task.model
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.optimizer.state_dict())
    rng = rng_state()
    try:
        return sweep(run, stage, task, optimizer, start, end, steps)
    finally:
        model.load_state_dict(weights)
        optimizer.optimizer.load_state_dict(optimizer_state)
        set_rng_state(rng)


def sweep(run: RunContext, stage: Stage, task: Task, optimizer: StageOptimizer, start: float, end: float,
          steps: int) -> tuple[list[float], list[float], list[float], str]:
    """The range test's updates, as the stage's own (its batches, micro-batches, penalties and
    clipping) with the LR of update i at start * (end / start) ** (i / (steps - 1))."""
    numbers, model, device = stage.resolved, task.model, run.device
    reg = numbers.config.regularization
    run.dropout_of(model).set(reg.dropout)
    seed_everything(derive_seed(run.plan.seed, numbers.name))
    sampler = task.sampler(numbers.block_size, numbers.batch_size, derive_seed(run.plan.seed, numbers.name, "data"))
    stage.layers.apply(sampler.epoch)
    model.train()
    params = [p for n, p in model.named_parameters() if n in stage.layers.held]
    lrs: list[float] = []
    smooth: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    run.view.stage_start(f"lr-find {numbers.name}", steps)
    stopped = f"reached the end LR {end:g}"
    for i in range(steps):
        lr = start * (end / start) ** (i / (steps - 1))
        optimizer.set_lr(lr)
        update_loss = torch.zeros((), device=device)
        for batch, share in micro_batches(sampler, numbers):
            loss = task.loss(tuple(t.to(device, non_blocking=True) for t in batch))
            (loss * share).backward()
            update_loss += loss.detach() * share
        penalty = weight_penalty(model, optimizer.loss_l1, reg.l2)
        if penalty is not None:
            penalty.backward()
        if reg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, reg.grad_clip)
        optimizer.optimizer.step()
        optimizer.optimizer.zero_grad(set_to_none=True)
        value = update_loss.item()
        if not math.isfinite(value):
            stopped = f"the loss is not finite at LR {lr:.3g}"
            break
        average = BETA * average + (1 - BETA) * value
        smoothed = average / (1 - BETA ** (i + 1))
        lrs.append(lr)
        smooth.append(smoothed)
        losses.append(value)
        best = min(best, smoothed)
        if (i + 1) % max(1, steps // 20) == 0:
            run.view.step(f"lr-find {numbers.name}", i + 1, steps, i + 1, {"lr": lr, "loss": smoothed})
        if smoothed > DIVERGED * best:
            stopped = f"the smoothed loss passed {DIVERGED:g}x its minimum at LR {lr:.3g}"
            break
    run.dropout_of(model).set(None)
    return lrs, smooth, losses, stopped


def suggestions(lrs: list[float], smooth: list[float]) -> tuple[float | None, float | None]:
    """fastai's: (the LR where the smoothed loss falls fastest against log LR, the LR of its
    minimum / 10), over its read_window; none when the loss falls less than MIN_FALL there. The
    steepest descent is looked for up to the minimum: past it the loss only rises."""
    lrs, smooth = read_window(lrs, smooth)
    if len(lrs) < 2 or fall(smooth) < MIN_FALL:  # no descent to read an LR from
        return None, None
    best = min(range(len(smooth)), key=smooth.__getitem__)
    slopes = [(smooth[i + 1] - smooth[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(max(best, 1))]
    steep = lrs[min(range(len(slopes)), key=slopes.__getitem__)]
    return steep, lrs[best] / 10


def read_window(lrs: list[float], smooth: list[float]) -> tuple[list[float], list[float]]:
    """The part of the sweep suggestions read: without its first tenth and last five points (the
    smoothing's start and the divergence), or all of it when that leaves too few."""
    skip = len(lrs) // 10
    lo, hi = (skip, len(lrs) - 5) if len(lrs) - 5 - skip >= 3 else (0, len(lrs))
    return lrs[lo:hi], smooth[lo:hi]


def fall(smooth: list[float]) -> float:
    """How far the smoothed loss falls from its start to its minimum, as a share of the start."""
    return (smooth[0] - min(smooth)) / abs(smooth[0]) if smooth and smooth[0] else 0.0


def _plot(lrs: list[float], smooth: list[float], losses: list[float], steep: float | None, minimum: float | None,
          stage: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss")
    ax.plot(lrs, smooth, color="tab:blue", label="smoothed loss")
    for lr, name, colour in ((steep, "steepest", "tab:red"), (minimum, "minimum / 10", "tab:green")):
        if lr is not None:
            ax.axvline(lr, color=colour, linestyle="--", label=f"{name}: {lr:.2e}")
    # The smoothed curve sets the scale (fastai's plot): the raw losses of the divergence would flatten it.
    if smooth:
        margin = 0.05 * (max(smooth) - min(smooth)) + 1e-3
        ax.set_ylim(min(smooth) - margin, max(smooth) + margin)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test of stage '{stage}'")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
