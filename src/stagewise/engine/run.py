"""A whole plan: train the stages in order (a tree, when stages branch), handing the weights and,
when asked, the optimizer state on; reusing every stage the store already holds and resuming the
one that was cut off; then the summary and the sample. Setup is engine.prepare's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from stagewise.data.tokenizers import save_tokenizer
from stagewise.engine.checkpoint import InvalidCheckpoint, StageStore, load_checkpoint
from stagewise.engine.checkpointer import Checkpointer
from stagewise.engine.context import RunContext
from stagewise.engine.device import autocast_factory, resolve_device, resolve_threads, settings_line
from stagewise.engine.handoff import HeldState, StageOptimizer
from stagewise.engine.parent import load_parent
from stagewise.engine.prepare import Prepared, Stage
from stagewise.engine.sample import generate_sample
from stagewise.engine.signals import StopRequest
from stagewise.engine.status import complete
from stagewise.engine.trainer import StageTrainer
from stagewise.errors import RunStopped
from stagewise.plan.resolve import ResolvedStage, pinned_steps
from stagewise.tasks.base import Task
from stagewise.tasks.export import MARKER
from stagewise.track.logs import RunLogs, started_threads
from stagewise.track.progress import ProgressView, StageSummary


def train(prepared: Prepared, run_dir: Path, fresh: bool = False, console: Console | None = None,
          stop_after: int | None = None) -> list[StageSummary]:
    """Run (or continue) the plan into `run_dir`. `stop_after`: stop as a signal would once this
    global step is done (for verify-resume and tests)."""
    plan = prepared.plan
    if fresh:  # start over: forget this run and every stage of this plan in the store
        shutil.rmtree(run_dir, ignore_errors=True)
        for stage in prepared.stages:
            shutil.rmtree(prepared.store(stage).dir, ignore_errors=True)
    resumed = (run_dir / "events.jsonl").exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Without the nulls (unset optional keys), so the resolved plan loads back as a plan.
    resolved = plan.model_dump(mode="json", by_alias=True, exclude_none=True)
    (run_dir / "plan.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if prepared.data is not None:
        save_tokenizer(prepared.data.tokenizer, run_dir)

    device = resolve_device(plan.device)
    dtype = prepared.dtype
    threads = resolve_threads(plan.threads, started_threads(run_dir) if resumed else None)
    torch.set_num_threads(threads)
    models = list({id(s.model): s.model for s in prepared.stages}.values())
    for model in models:
        model.to(device)
    run = RunContext(plan=plan, run_dir=run_dir, device=device, autocast=autocast_factory(device, dtype),
                     logs=RunLogs(run_dir), view=ProgressView(prepared.total_steps, console))
    tasks: dict[tuple[int, int, str, int, tuple[str, ...]], Task] = {}  # one per model and data: a compiled loss is compiled once
    summaries: list[StageSummary] = []
    hint = f"stagewise train {prepared.plan_path} --out {run_dir}"
    try:
        run.logs.event("plan_start", plan=plan.name, device=str(device), resumed=resumed,
                       precision="fp32" if dtype is None else str(dtype).removeprefix("torch."),
                       parameters=sum(p.numel() for p in prepared.root.parameters()),
                       attention=getattr(getattr(prepared.root, "config", None), "_attn_implementation", None),
                       compiled=prepared.compiled, threads=threads,
                       stages=[{"name": s.name, "parent": s.parent, "start_step": s.start_step, "steps": s.steps,
                                "tokens_per_step": s.tokens_per_step, "unit": s.unit, "task": s.config.task,
                                "key": s.key} for s in prepared.resolved])
        run.view.print(settings_line(device, dtype, prepared.compiled, threads, plan))
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
    except (RunStopped, KeyboardInterrupt) as e:
        run.logs.event("plan_interrupted", plan=plan.name, reason=str(e) or "interrupted")
        raise
    except Exception as e:
        run.logs.event("plan_failed", plan=plan.name, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        run.view.close()
        run.logs.close()
    run.view.summary(summaries)
    last = prepared.stages[-1]
    if plan.sample is not None and last.spec.samples and prepared.data is not None:
        text = generate_sample(run, last.model, prepared.data, last.setup.chat)
        (run_dir / "sample.txt").write_text(text, encoding="utf-8")  # for `stagewise report`
        run.view.print(f"sample:\n{text}")
    return summaries


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
    tokens = placed[parent.name].start_tokens + at * placed[parent.name].tokens_per_step
    return dataclasses.replace(numbers, start_step=start, start_tokens=tokens)


def _run_stage(run: RunContext, prepared: Prepared, stage: Stage, numbers: ResolvedStage, task: Task,
               held: HeldState, checkpointer: Checkpointer) -> StageSummary:
    store = checkpointer.store
    with store.lock():  # a second process training the same stage waits here, then reuses it
        if complete(store, checkpointer.pins):
            manifest = store.final_manifest()
            assert manifest is not None
            summary = StageSummary(**{**manifest["summary"], "reused": True})
            run.logs.event("stage_reused", stage=stage.name, key=stage.key, step=numbers.start_step,
                           steps=numbers.steps, tokens_per_step=numbers.tokens_per_step, val_loss=summary.val_loss)
            run.view.print(f"[{stage.name}] reused from the stage cache ({stage.key})")
            _export(run, prepared, stage, numbers.start_step + summary.steps, store, held)
            return summary
        missing = checkpointer.pins - set(store.steps())
        resume = _resume_point(run, store, task.model, limit=min(missing, default=numbers.steps))
        optimizer = StageOptimizer(numbers, task.model, stage.layers)
        start_lr = None
        if resume is None:
            load_parent(run, prepared, stage, numbers.start_step, held)
            start_lr = optimizer.hand_off(held, run.logs)
        resumed_at = resume[0]["progress"]["step"] if resume is not None else 0
        if resume is not None:
            run.logs.event("stage_resumed", stage=stage.name, step=numbers.start_step + resumed_at,
                           stage_step=resumed_at, checkpoint=str(resume[1]))
            run.view.print(f"[{stage.name}] resuming at step {resumed_at} of {numbers.steps} from {resume[1]}")
        attempt = resume[0]["control"]["memory"]["attempt"] if resume is not None else 0
        run.logs.metrics.keep_only(lambda r: _logged_before(r, numbers, resumed_at, attempt))
        trainer = StageTrainer(run, numbers, task, stage.layers, optimizer, checkpointer)
        outcome = trainer.train(resume[0] if resume is not None else None, start_lr)
        summary = outcome.summary
        checkpointer.save_final(outcome.final_state, summary)
        held.hold((stage.key, None), numbers, outcome.final_state, outcome.optimizer)
        run.logs.event("stage_end", stage=stage.name, step=numbers.start_step + summary.steps,
                       seconds=round(summary.seconds, 3), train_loss=summary.train_loss, val_loss=summary.val_loss)
        _export(run, prepared, stage, numbers.start_step + summary.steps, store, held)
        return summary


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


def _resume_point(run: RunContext, store: StageStore, model: nn.Module, limit: int) -> tuple[dict[str, Any], Path] | None:
    """Load the newest intact checkpoint at or before `limit` (weights into the model): its state
    and directory. A broken one is reported in one line and the one before it is used."""
    for step in reversed(store.steps()):
        if step > limit:
            continue
        try:
            loaded, _ = load_checkpoint(store.step_dir(step), store.key, model)
            return loaded, store.step_dir(step)
        except InvalidCheckpoint as e:
            run.logs.event("checkpoint_invalid", key=store.key, step=step, reason=str(e))
            run.view.print(f"warning: {e}; using the checkpoint before it")
    return None


def _export(run: RunContext, prepared: Prepared, stage: Stage, end_step: int, store: StageStore,
            held: HeldState) -> None:
    """The stage's final model as a directory that can be used on its own (tasks.export);
    `stagewise.json`, written last, marks it complete."""
    out = run.run_dir / "stages" / stage.name
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("key") == stage.key:
        return
    setup = stage.setup
    if held.marker != (stage.key, None):  # a reused stage: its weights come from the store
        loaded, _ = load_checkpoint(store.final_dir, stage.key, setup.model)
        held.hold((stage.key, None), stage.resolved, loaded)
    setup.spec.save(setup, prepared.data.tokenizer if prepared.data else None, prepared.plan.model, out)
    marker.write_text(json.dumps({"key": stage.key, "stage": stage.name, "task": setup.task, "labels": setup.labels}))
    run.logs.event("stage_saved", stage=stage.name, step=end_step, path=str(out.relative_to(run.run_dir)))


