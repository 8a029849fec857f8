"""A whole plan: train the stages in order (a tree, when stages branch), handing the weights and,
when asked, the optimizer state on; reusing every stage the store already holds and resuming the
one that was cut off; then the summary and the sample. Setup is engine.prepare_run's."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from stagewise.data.tokenizers import save_tokenizer
from stagewise.engine.callbacks import Callback
from stagewise.engine.checkpoint import WRITE_ERRORS, InvalidCheckpoint, load_checkpoint
from stagewise.engine.checkpointer import Checkpointer
from stagewise.engine.context import RunContext
from stagewise.engine.device import autocast_factory, resolve_device, resolve_threads, settings_line
from stagewise.engine.distributed import SINGLE, World, check_split, split_fields
from stagewise.engine.loop import StageTrainer
from stagewise.engine.merge_stage import load_merged
from stagewise.engine.parent import load_parent
from stagewise.engine.prepare_run import Prepared, Stage
from stagewise.engine.progress import ProgressView, StageSummary
from stagewise.engine.run_logs import RunLogs, started_threads
from stagewise.engine.rundir import run_directory
from stagewise.engine.sample import generate_sample
from stagewise.engine.sharded import full_model, shard_model
from stagewise.engine.signals import StopRequest
from stagewise.engine.stage_optimizer import HeldState, StageOptimizer
from stagewise.engine.status import bad_pin, complete, handoff_probe
from stagewise.engine.trackers import check_installed, make_trackers
from stagewise.engine.trackers.tracking import ReportWriter, RunEnd, Tracking
from stagewise.errors import RunStopped, WriteFailed
from stagewise.plan.resolve import pinned_steps
from stagewise.plan.resolved import ResolvedStage
from stagewise.tasks.base import Task
from stagewise.tasks.export import MARKER
from stagewise.tasks.traits import Exports


def train(prepared: Prepared, run_dir: Path, fresh: bool = False, console: Console | None = None,
          stop_after: int | None = None, world: World = SINGLE,
          callbacks: Sequence[Callback] = (), report: ReportWriter | None = None) -> list[StageSummary]:
    """Run (or continue) the plan into `run_dir`, holding its lock. `fresh`: start over, forgetting
    this run and every stage of this plan in the store (only a run directory is ever emptied).
    `stop_after`: stop as a signal would once this global step is done (for verify-resume and tests).
    `world`: this process's place in a data-parallel run (rank 0 holds the lock, the others wait).
    `callbacks`: the user's (engine.callbacks), called in every stage trained (not in reused ones).
    `report`: writes a run's report page (track.report, above this layer), for the trackers' end."""
    hint = f"stagewise train {prepared.plan_path} --out {run_dir}"
    check_installed(prepared.plan.track, str(prepared.plan_path))
    if world.parallel and prepared.plan.distributed.strategy == "fsdp":
        world = dataclasses.replace(world, sharded=True)
    check_split(world, prepared.resolved, str(prepared.plan_path))
    try:
        with world.on_main(run_directory(run_dir, fresh)) as resumed:
            if fresh and world.is_main:
                for stage in prepared.stages:
                    store = prepared.store(stage)
                    with store.lock():  # not under a process training the same stage
                        store.clear()
            resumed = world.from_main(lambda: resumed)  # and the others start once rank 0 holds the lock
            return _train(prepared, run_dir, bool(resumed), console, stop_after, hint, world, tuple(callbacks), report)
    except WriteFailed as e:
        raise RunStopped(f"{e}; the checkpoints saved before it are intact. Free space, then resume with: {hint}",
                         code=e.code) from None


def _train(prepared: Prepared, run_dir: Path, resumed: bool, console: Console | None, stop_after: int | None,
           hint: str, world: World, callbacks: tuple[Callback, ...], report: ReportWriter | None) -> list[StageSummary]:
    plan = prepared.plan
    # Without the nulls (unset optional keys), so the resolved plan loads back as a plan.
    resolved = plan.model_dump(mode="json", by_alias=True, exclude_none=True)
    if world.is_main:
        _write(run_dir / "plan.yaml", lambda path: path.write_text(yaml.safe_dump(resolved, sort_keys=False)))
        if (data := prepared.data) is not None:
            _write(run_dir / "tokenizer.json", lambda path: save_tokenizer(data.tokenizer, path.parent))

    device = world.place(resolve_device(plan.device))
    dtype = prepared.dtype
    threads = resolve_threads(plan.threads, started_threads(run_dir) if resumed else None)
    torch.set_num_threads(threads)
    models = list({id(s.model): s.model for s in prepared.stages}.values())
    for model in models:
        model.to(device)
        if world.sharded:
            shard_model(model, dtype)
    # Only rank 0 logs, so only rank 0 opens the trackers.
    tracking = Tracking(run_dir, make_trackers(plan.track), resolved) if world.is_main else None
    run = RunContext(plan=plan, run_dir=run_dir, device=device, autocast=autocast_factory(device, dtype), dtype=dtype,
                     logs=RunLogs(run_dir, write=world.is_main, tracking=tracking),
                     view=ProgressView(prepared.total_steps, console), world=world, callbacks=callbacks)
    tasks: dict[tuple[int, int, str, int, tuple[str, ...]], Task] = {}  # one per model and data: a compiled loss is compiled once
    summaries: list[StageSummary] = []
    try:
        run.logs.event("plan_start", plan=plan.name, device=str(device), resumed=resumed,
                       precision="fp32" if dtype is None else str(dtype).removeprefix("torch."),
                       parameters=sum(p.numel() for p in prepared.root.parameters()),
                       attention=getattr(getattr(prepared.root, "config", None), "_attn_implementation", None),
                       compiled=prepared.compiled, threads=threads, world_size=world.size,
                       split="batch.size / world_size per rank, accumulate unchanged",
                       stages=[{"name": s.name, "parent": s.parent, "start_step": s.start_step, "steps": s.steps,
                                "tokens_per_step": s.tokens_per_step, "unit": s.unit, "task": s.config.task,
                                "key": s.key, **split_fields(world, s)} for s in prepared.resolved])
        run.view.print(settings_line(device, dtype, prepared.compiled, threads, plan))
        if world.parallel:
            run.view.print(f"data parallel: {world.size} processes ({plan.distributed.strategy}); each micro-batch's "
                           "sequences split over them: " + ", ".join(
                               f"{s.name} {split_fields(world, s)['batch_per_rank']} per rank x {s.micro_batches}"
                               for s in prepared.resolved))
        with StopRequest() as stop:
            held = HeldState()
            pins = pinned_steps(prepared.resolved)
            placed: dict[str, ResolvedStage] = {}  # each stage on the plan's step axis as it ran
            ran: dict[str, int] = {}  # the updates each stage made (fewer when it ended early)
            for stage in prepared.stages:
                numbers = _placed(stage, placed, ran)
                setup, cfg = stage.setup, numbers.config
                task_key = (id(setup.model), id(setup.data), setup.task, cfg.eval.beam, tuple(cfg.eval.metrics or ()))
                if task_key not in tasks:
                    tasks[task_key] = setup.spec.bind(setup, cfg, cfg.data or plan.data, device, run.autocast,
                                                      prepared.compiled)
                checkpointer = Checkpointer(run, numbers, setup.model, prepared.store(stage), pins[stage.name],
                                            stop, stop_after, hint)
                summaries.append(_run_stage(run, prepared, stage, numbers, tasks[task_key], held, checkpointer))
                placed[stage.name], ran[stage.name] = numbers, summaries[-1].steps
        run.logs.event("plan_end", plan=plan.name)
    except BaseException as e:
        stopped = isinstance(e, (RunStopped, KeyboardInterrupt))
        fields = {"reason": str(e) or "interrupted"} if stopped else {"error": f"{type(e).__name__}: {e}"}
        _quietly(lambda: run.logs.event("plan_interrupted" if stopped else "plan_failed", plan=plan.name, **fields))
        run.view.close()
        # a full disk may refuse the last flush too; the first failure is the one told
        _quietly(lambda: run.logs.close(RunEnd("interrupted" if stopped else "failed")))
        raise
    run.view.close()
    run.view.summary(summaries)
    try:
        last = prepared.stages[-1]
        if plan.sample is not None and last.spec.traits.samples and prepared.data is not None and (world.is_main or world.sharded):
            text = generate_sample(run, last.model, prepared.data, last.setup.chat)  # sharded: every rank, in step
            if world.is_main:
                _write(run_dir / "sample.txt", lambda path: path.write_text(text, encoding="utf-8"))  # for `stagewise report`
                run.view.print(f"sample:\n{text}")
    except BaseException:
        _quietly(lambda: run.logs.close(RunEnd("failed")))
        raise
    run.logs.close(_complete(run, summaries, report) if tracking is not None and tracking.wants_files
                   else RunEnd("complete"))
    return summaries


def _complete(run: RunContext, summaries: list[StageSummary], write_report: ReportWriter | None) -> RunEnd:
    """A complete run's end for the trackers: its report page (written as `stagewise report` would),
    the summary rows and each stage's export. A report that cannot be written is left out."""
    report = None
    try:
        report = write_report(run.run_dir) if write_report is not None else None
    except OSError as e:
        run.view.print(f"warning: the report for the trackers could not be written ({e})")
    exports = {s.stage: str(run.run_dir / "stages" / s.stage) for s in summaries
               if (run.run_dir / "stages" / s.stage / MARKER).is_file()}
    return RunEnd("complete", report, [dataclasses.asdict(s) for s in summaries], exports)


def _placed(stage: Stage, placed: dict[str, ResolvedStage], ran: dict[str, int]) -> ResolvedStage:
    """The stage's numbers with its first step where its parent really ended (or the branch point
    on the parent's axis): after an early stop the next stage goes on from there, no gap."""
    numbers, parent = stage.resolved, stage.parent
    if parent is None:
        return numbers
    at = numbers.parent_step if numbers.parent_step is not None else ran[parent.name]
    start = placed[parent.name].start_step + at
    if start == numbers.start_step:
        return numbers
    tokens = placed[parent.name].start_tokens + placed[parent.name].tokens_before(at)
    return dataclasses.replace(numbers, start_step=start, start_tokens=tokens)


def _run_stage(run: RunContext, prepared: Prepared, stage: Stage, numbers: ResolvedStage, task: Task,
               held: HeldState, checkpointer: Checkpointer) -> StageSummary:
    """Reuse the stage when the store holds its end (and it reads back), else resume it from its
    newest valid checkpoint, else train it from its parent's state; then save its end and export."""
    store = checkpointer.store
    with run.world.on_main(store.lock()):  # a second process training the same stage waits here, then reuses it
        run.world.barrier()  # the other ranks read the store once rank 0 holds its lock
        limit = min(checkpointer.pins - set(store.steps()), default=numbers.steps)  # resume before a missing pin
        broken: tuple[int | None, InvalidCheckpoint] | None = None
        if complete(store, checkpointer.pins):
            broken = bad_pin(store, checkpointer.pins, task.model, numbers)
            if broken is not None:
                limit = min(limit, broken[0] - 1)  # train through the branch point again
            else:
                try:
                    return _reuse(run, prepared, stage, numbers, held)
                except InvalidCheckpoint as e:
                    broken = (None, e)
        trainer = _resume(run, stage, numbers, task, checkpointer, limit)
        if broken is not None:
            then = (f"stage '{stage.name}' resumes from step {trainer.progress.step}" if trainer is not None
                    else f"stage '{stage.name}' is trained again from its start")
            checkpointer.invalid(broken[0], broken[1], then)
        lr_factor = None
        if trainer is None:
            optimizer = StageOptimizer(numbers, task.model, stage.layers)
            if numbers.merged:  # no updates: evaluated and saved as the stage's end
                load_merged(run, prepared, stage, held)
            else:
                load_parent(run, prepared, stage, numbers.start_step, held)
                lr_factor = optimizer.hand_off(held, run.logs)
            trainer = StageTrainer(run, numbers, task, stage.layers, optimizer, checkpointer)
        resumed_at = trainer.progress.step
        run.logs.metrics.keep_only(lambda r: _logged_before(r, numbers, resumed_at, trainer.control.attempt))
        outcome = trainer.train(lr_factor)
        summary = outcome.summary
        checkpointer.save_final(outcome.final_state, summary)
        held.hold((stage.key, None), numbers, outcome.final_state, outcome.optimizer)
        run.logs.event("stage_end", stage=stage.name, step=numbers.start_step + summary.steps,
                       seconds=round(summary.seconds, 3), train_loss=summary.train_loss, val_loss=summary.val_loss,
                       tokens=summary.tokens, **summary.utilization())
        _export(run, prepared, stage, numbers.start_step + summary.steps, held)
        return summary


def _reuse(run: RunContext, prepared: Prepared, stage: Stage, numbers: ResolvedStage, held: HeldState) -> StageSummary:
    """The stage's end from the store: its weights into the model, its state held for the
    children; InvalidCheckpoint when it does not read back."""
    store = prepared.store(stage)
    manifest = store.final_manifest()
    assert manifest is not None
    try:
        summary = StageSummary(**{**manifest["summary"], "reused": True})
    except (KeyError, TypeError) as e:
        raise InvalidCheckpoint(f"{store.final_dir}: its manifest's summary is malformed "
                                f"({type(e).__name__})") from None
    state, _ = load_checkpoint(store.final_dir, stage.key, stage.model, apply=handoff_probe(numbers))
    held.hold((stage.key, None), numbers, state)
    if "logs" in state:  # absent from the caches of older versions
        run.logs.bring_back(stage.name, state["logs"])
    run.logs.event("stage_reused", stage=stage.name, key=stage.key, step=numbers.start_step, steps=numbers.steps,
                   tokens_per_step=numbers.tokens_per_step, val_loss=summary.val_loss, tokens=summary.tokens)
    run.view.print(f"[{stage.name}] reused from the stage cache ({stage.key})")
    _export(run, prepared, stage, numbers.start_step + summary.steps, held)
    return summary


def _resume(run: RunContext, stage: Stage, numbers: ResolvedStage, task: Task, checkpointer: Checkpointer,
            limit: int) -> StageTrainer | None:
    """A trainer continuing from the newest valid checkpoint at or before `limit` (its weights in
    the model); None when there is none. An invalid one is reported and the one before it tried."""
    store = checkpointer.store
    steps = [s for s in reversed(store.steps()) if s <= limit]
    for i, step in enumerate(steps):
        trainer = StageTrainer(run, numbers, task, stage.layers, StageOptimizer(numbers, task.model, stage.layers),
                               checkpointer)
        try:
            load_checkpoint(store.step_dir(step), store.key, task.model, apply=trainer.resume)
        except InvalidCheckpoint as e:
            checkpointer.invalid(step, e, "using the checkpoint before it" if i + 1 < len(steps)
                                 else f"no checkpoint before it: stage '{stage.name}' starts from its parent")
            continue
        run.logs.event("stage_resumed", stage=stage.name, step=numbers.start_step + step, stage_step=step,
                       checkpoint=str(store.step_dir(step)))
        run.view.print(f"[{stage.name}] resuming at step {step} of {numbers.steps} from {store.step_dir(step)}")
        return trainer
    return None


def _logged_before(record: dict[str, Any], stage: ResolvedStage, resumed_at: int, attempt: int) -> bool:
    """Whether a metrics line was logged before the checkpoint a stage resumes from (at
    `resumed_at` in rollback attempt `attempt`); the others are logged again. The stage's final
    eval comes after its last checkpoint, so it always goes."""
    if record.get("stage") != stage.name:
        return True
    if record.get("attempt", 0) != attempt:
        return record.get("attempt", 0) < attempt
    final_eval = record.get("kind") == "eval" and record.get("stage_step") == stage.steps
    return record.get("stage_step", 0) <= resumed_at and not final_eval


def _export(run: RunContext, prepared: Prepared, stage: Stage, end_step: int, held: HeldState) -> None:
    """The stage's final model (held in memory: trained or reused) as a directory that can be
    used on its own (tasks.export) when its task exports (tasks.traits.Exports); `stagewise.json`,
    written last, marks it complete."""
    assert held.marker == (stage.key, None)
    out = run.run_dir / "stages" / stage.name
    marker = out / MARKER

    def exported() -> bool:
        try:
            return marker.is_file() and json.loads(marker.read_text()).get("key") == stage.key
        except (OSError, ValueError):
            return False  # a damaged marker: export again

    if not (run.world.is_main or run.world.sharded) or not isinstance(stage.setup.spec, Exports):
        return  # a task without exports: the stage's checkpoint is all there is
    if run.world.from_main(exported) if run.world.sharded else exported():  # sharded: all ranks decide as one
        return
    with full_model(run.world, stage.model) as model:  # sharded: gathered by every rank for rank 0
        if model is None:
            return
        setup, spec = dataclasses.replace(stage.setup, model=model), stage.setup.spec

        def save(_: Path) -> None:
            spec.save(setup, prepared.data.tokenizer if prepared.data else None, prepared.plan.model, out)
            marker.write_text(json.dumps({"key": stage.key, "stage": stage.name, "task": setup.task,
                                          "labels": setup.labels}))

        _write(out, save)
    run.logs.event("stage_saved", stage=stage.name, step=end_step, path=str(out.relative_to(run.run_dir)))


def _write(path: Path, write: Callable[[Path], Any]) -> None:
    """Run a write of `path`; a full disk or unwritable path (whatever the writer raises for it:
    OSError, torch's RuntimeError, SafetensorError, tokenizers' bare Exception) is a WriteFailed."""
    try:
        write(path)
    except WRITE_ERRORS as e:
        raise WriteFailed(path, e) from None
    except Exception as e:
        if type(e) is not Exception:  # tokenizers' (Rust) I/O errors are plain Exceptions; others are bugs
            raise
        raise WriteFailed(path, e) from None


def _quietly(action: Callable[[], Any]) -> None:
    """A log write while the run is already stopping: its own failure would hide the first."""
    try:
        action()
    except (WriteFailed, OSError):
        pass
