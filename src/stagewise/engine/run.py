"""A whole plan: setup (data, model, resolved stages: everything checked before training) ->
train the stages in order (a tree, when stages branch), handing the weights and, when asked, the
optimizer state on; reusing every stage the store already holds and resuming the one that was cut
off -> cleanup (summary, sample)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from stagewise.data.prepare import PreparedData, prepare_data
from stagewise.data.tokenizers import eos_id, save_tokenizer, to_transformers
from stagewise.engine.checkpoint import (CheckpointWriteError, InvalidCheckpoint, StageStore, load_checkpoint,
                                         save_checkpoint)
from stagewise.engine.context import RunContext
from stagewise.engine.device import autocast_factory, resolve_device, resolve_precision, seed_everything
from stagewise.engine.loop import LanguageModelLoss, train_stage
from stagewise.engine.signals import StopRequest
from stagewise.errors import RunStopped, UserError
from stagewise.models.build import DropoutControl, build_model, context_length, set_attention
from stagewise.models.generate import sample
from stagewise.optim.handoff import SwatsEstimate, convert_adam_to_sgd, swats_lr
from stagewise.optim.optimizers import apply_settings, build_optimizer
from stagewise.plan.resolve import ResolvedStage, pinned_steps, resolve_stages
from stagewise.plan.schema import Plan
from stagewise.track.logs import RunLogs
from stagewise.track.progress import ProgressView, StageSummary

hf_logging.disable_progress_bar()  # save_pretrained's shard bars would interleave with ours

_PLAN_KEYS = ("model", "tokenizer", "data", "stages", "device", "sample")


@dataclass
class Prepared:
    """A plan with its data, model and stages settled: nothing left that could fail as bad input."""

    plan: Plan
    plan_path: Path
    data: PreparedData
    model: PreTrainedModel
    stages: list[ResolvedStage]
    cache_root: Path  # token cache and stage store

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def store(self, stage: ResolvedStage) -> StageStore:
        return StageStore(self.cache_root, stage.key)


def prepare(plan: Plan, plan_path: Path, cache_root: Path) -> Prepared:
    try:
        data = prepare_data(plan.data, plan.tokenizer, plan_path.parent, cache_root)
        seed_everything(plan.seed)  # the model's initial weights come from the plan's seed
        model = build_model(plan.model, data.vocab_size, eos_id(data.tokenizer), plan_path.parent)
        device = resolve_device(plan.device)
        set_attention(model, plan.model.attention, plan.compile, device)
        identity = {"model": plan.model.model_dump(mode="json"), "tokenizer": plan.tokenizer.model_dump(mode="json"),
                    "data": data.fingerprint, "seed": plan.seed,
                    "precision": str(resolve_precision(plan.precision, device))}
        stages = resolve_stages(plan, len(data.train), context_length(model), identity, where=str(plan_path))
    except UserError as e:
        if e.where.split(".")[0].split("[")[0] in _PLAN_KEYS:  # a key path: name the plan file too
            raise UserError(f"{plan_path}: {e.where}", e.message) from None
        raise
    for stage in stages:
        if len(data.val) - 1 < stage.block_size:
            raise UserError(f"{plan_path}: data.val", f"the validation split has {len(data.val)} tokens: "
                                                      f"too few for one sequence of {stage.block_size} "
                                                      f"(stage '{stage.name}')")
    return Prepared(plan, plan_path, data, model, stages, cache_root)


def stage_status(prepared: Prepared) -> dict[str, str]:
    """What `train` will do with each stage: reuse it, resume it, or train it."""
    pins = pinned_steps(prepared.stages)
    status = {}
    for stage in prepared.stages:
        store = prepared.store(stage)
        if _complete(store, pins[stage.name]):
            status[stage.name] = "reuse"
        elif store.steps():
            status[stage.name] = f"resume at step {store.steps()[-1]}"
        else:
            status[stage.name] = "train"
    return status


def train(prepared: Prepared, run_dir: Path, fresh: bool = False, console: Console | None = None,
          stop_after: int | None = None) -> list[StageSummary]:
    """Run (or continue) the plan into `run_dir`. `stop_after`: stop as a signal would once this
    global step is done (for verify-resume and tests)."""
    plan, model = prepared.plan, prepared.model
    if fresh:  # start over: forget this run and every stage of this plan in the store
        shutil.rmtree(run_dir, ignore_errors=True)
        for stage in prepared.stages:
            shutil.rmtree(prepared.store(stage).dir, ignore_errors=True)
    resumed = (run_dir / "events.jsonl").exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.yaml").write_text(yaml.safe_dump(plan.model_dump(mode="json", by_alias=True), sort_keys=False))
    save_tokenizer(prepared.data.tokenizer, run_dir)

    device = resolve_device(plan.device)
    dtype = resolve_precision(plan.precision, device)
    model.to(device)
    run = RunContext(
        plan=plan, run_dir=run_dir, model=model,
        loss=torch.compile(LanguageModelLoss(model)) if plan.compile else LanguageModelLoss(model),
        device=device, autocast=autocast_factory(device, dtype),
        data=prepared.data, dropout=DropoutControl(model), logs=RunLogs(run_dir),
        view=ProgressView(prepared.total_steps, console))
    summaries: list[StageSummary] = []
    hint = f"stagewise train {prepared.plan_path} --out {run_dir}"
    try:
        run.logs.event("plan_start", plan=plan.name, device=str(device), resumed=resumed,
                       precision="fp32" if dtype is None else str(dtype).removeprefix("torch."),
                       parameters=sum(p.numel() for p in model.parameters()),
                       attention=model.config._attn_implementation, compiled=plan.compile,
                       stages=[{"name": s.name, "parent": s.parent, "start_step": s.start_step, "steps": s.steps,
                                "tokens_per_step": s.tokens_per_step, "key": s.key} for s in prepared.stages])
        with StopRequest() as stop:
            state = _InMemory()
            pins = pinned_steps(prepared.stages)
            for stage in prepared.stages:
                checkpointer = Checkpointer(run, stage, prepared.store(stage), pins[stage.name], stop, stop_after, hint)
                summaries.append(_run_stage(run, prepared, stage, state, checkpointer))
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
    if plan.sample is not None:
        run.view.print(f"sample:\n{generate_sample(run)}")
    return summaries


@dataclass
class _InMemory:
    """Which stage state the model (and optimizer) in memory hold: (stage key, step or None for
    its end). A stage whose parent state is not in memory loads it from the store."""

    marker: tuple[str, int | None] | None = None
    optimizer: torch.optim.Optimizer | None = None  # the live optimizer of that state, if any
    optimizer_state: dict[str, Any] | None = None  # else its saved state, when loaded from the store
    optimizer_spec: dict[str, Any] | None = None  # {"name", "settings"} of that optimizer
    swats: dict[str, Any] | None = None  # its SWATS estimate, when the stage kept one

    def hold(self, marker: tuple[str, int | None], stage: ResolvedStage, state: dict[str, Any],
             optimizer: torch.optim.Optimizer | None = None) -> None:
        """Note the state of `stage` (its checkpoint's hand-off part, loop.handoff_state) as held."""
        self.marker, self.optimizer = marker, optimizer
        self.optimizer_state = None if optimizer is not None else state["optimizer"]
        self.optimizer_spec = state["optimizer_spec"] or {"name": stage.optimizer, "settings": stage.optimizer_settings}
        self.swats = state["swats"]


def _complete(store: StageStore, pins: set[int]) -> bool:
    """The stage's end is saved, and every step a branch starts from (up to that end: a stage a
    rule ended early has no later steps)."""
    manifest = store.final_manifest()
    return manifest is not None and {p for p in pins if p <= manifest["step"]} <= set(store.steps())


def _run_stage(run: RunContext, prepared: Prepared, stage: ResolvedStage, state: _InMemory,
               checkpointer: Checkpointer) -> StageSummary:
    store = checkpointer.store
    with store.lock():  # a second process training the same stage waits here, then reuses it
        if _complete(store, checkpointer.pins):
            manifest = store.final_manifest()
            assert manifest is not None
            summary = StageSummary(**{**manifest["summary"], "reused": True})
            run.logs.event("stage_reused", stage=stage.name, key=stage.key, step=stage.start_step,
                           steps=stage.steps, tokens_per_step=stage.tokens_per_step, val_loss=summary.val_loss)
            run.view.print(f"[{stage.name}] reused from the stage cache ({stage.key})")
            _export(run, stage, store, state)
            return summary
        missing = checkpointer.pins - set(store.steps())
        resume = _resume_point(run, store, limit=min(missing, default=stage.steps))
        if resume is None:
            _load_parent(run, prepared, stage, state)
        optimizer, start_lr = _hand_off(run, stage, state)
        resumed_at = resume["progress"]["step"] if resume is not None else 0
        if resume is not None:
            run.logs.event("stage_resumed", stage=stage.name, step=stage.start_step + resumed_at, stage_step=resumed_at)
        attempt = resume["control"]["memory"]["attempt"] if resume is not None else 0
        run.logs.metrics.keep_only(lambda r: _logged_before(r, stage, resumed_at, attempt))
        outcome = train_stage(run, stage, optimizer, checkpointer, resume, track_swats=stage.track_swats,
                              start_lr=start_lr)
        summary = outcome.summary
        checkpointer.save_final(outcome.final_state, summary)
        state.hold((stage.key, None), stage, outcome.final_state, outcome.optimizer)
        run.logs.event("stage_end", stage=stage.name, step=stage.start_step + stage.steps,
                       seconds=round(summary.seconds, 3), train_loss=summary.train_loss, val_loss=summary.val_loss)
        _export(run, stage, store, state)
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


def _resume_point(run: RunContext, store: StageStore, limit: int) -> dict[str, Any] | None:
    """Load the newest intact checkpoint at or before `limit` (weights into the model); a broken
    one is reported in one line and the one before it is used."""
    for step in reversed(store.steps()):
        if step > limit:
            continue
        try:
            loaded, _ = load_checkpoint(store.step_dir(step), store.key, run.model)
            return loaded
        except InvalidCheckpoint as e:
            run.logs.event("checkpoint_invalid", key=store.key, step=step, reason=str(e))
            run.view.print(f"warning: {e}; using the checkpoint before it")
    return None


def _load_parent(run: RunContext, prepared: Prepared, stage: ResolvedStage, state: _InMemory) -> None:
    """Put the parent's state (its end, or the step a branch starts from) into the model."""
    if stage.parent is None:
        return  # the first stage starts from the model as built (or loaded) by `prepare`
    parent = next(s for s in prepared.stages if s.name == stage.parent)
    marker = (parent.key, stage.parent_step)
    if state.marker == marker:
        return
    store = prepared.store(parent)
    directory = store.final_dir if stage.parent_step is None else store.step_dir(stage.parent_step)
    try:
        loaded, _ = load_checkpoint(directory, parent.key, run.model)
    except InvalidCheckpoint as e:
        raise RunStopped(f"cannot start stage '{stage.name}': its parent checkpoint is unusable: {e}; "
                         "rerun with --fresh to retrain", code=2) from None
    state.hold(marker, parent, loaded)


def _hand_off(run: RunContext, stage: ResolvedStage, state: _InMemory) -> tuple[torch.optim.Optimizer, float | None]:
    """The stage's optimizer and what it takes from the parent's: its state (carry), Adam's
    moment as SGD's momentum (convert), or nothing (reset); always logged, with the reason. And
    the LR to start from when it is only known now (lr auto), else None."""
    l1 = stage.config.regularization.l1
    settings = dict(stage.optimizer_settings)
    where = {"stage": stage.name, "step": stage.start_step, "optimizer": stage.optimizer}
    start_lr = None
    if stage.auto_lr:
        momentum = settings.get("momentum", 0.0)
        swats = SwatsEstimate(0.0)
        if state.swats is None:
            raise RunStopped(f"stage '{stage.name}' has lr auto, but its parent's checkpoint holds no SWATS "
                             "estimate; rerun with --fresh", code=2)
        swats.load_state_dict(state.swats)
        settings["lr"] = start_lr = swats_lr(swats, momentum, f"stages.{stage.name}.optimizer.lr")
        run.logs.event("lr_auto", **where, lr=settings["lr"], swats_estimate=swats.corrected, swats_steps=swats.k)
    parent = state.optimizer
    spec = state.optimizer_spec
    if parent is None and state.optimizer_state is not None and spec is not None and stage.handoff != "reset":
        parent = build_optimizer(spec["name"], spec["settings"], run.model, l1=l1)
        parent.load_state_dict(state.optimizer_state)
    expected = {"carry": (stage.optimizer,), "convert": ("adam", "adamw"), "reset": None}[stage.handoff]
    if expected is not None and spec is not None and spec["name"] not in expected:
        run.logs.event("optimizer_reset", **where, reason=f"handoff {stage.handoff} asked for, but a rule "
                                                          f"switched the parent to {spec['name']}")
        return build_optimizer(stage.optimizer, settings, run.model, l1=l1), start_lr
    if stage.handoff == "carry" and parent is not None:
        apply_settings(parent, stage.optimizer, settings, l1=l1)
        run.logs.event("optimizer_carried", **where)
        return parent, start_lr
    optimizer = build_optimizer(stage.optimizer, settings, run.model, l1=l1)
    if stage.handoff == "convert" and parent is not None:
        converted = convert_adam_to_sgd(parent, optimizer)
        run.logs.event("optimizer_converted", **where, converted_parameters=converted,
                       how="sgd momentum buffer = adam m_hat / (1 - momentum)")
        return optimizer, start_lr
    reason = "first stage" if stage.parent is None else "handoff: reset"
    run.logs.event("optimizer_reset", **where, reason=reason)
    return optimizer, start_lr


def _export(run: RunContext, stage: ResolvedStage, store: StageStore, state: _InMemory) -> None:
    """The stage's final weights in safetensors, as a directory `from_pretrained` loads."""
    out = run.run_dir / "stages" / stage.name
    marker = out / "stagewise.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == stage.key:
        return
    if state.marker != (stage.key, None):  # a reused stage: its weights come from the store
        loaded, _ = load_checkpoint(store.final_dir, stage.key, run.model)
        state.hold((stage.key, None), stage, loaded)
    run.model.save_pretrained(out)
    to_transformers(run.data.tokenizer).save_pretrained(out)
    marker.write_text(json.dumps({"key": stage.key, "stage": stage.name}))
    run.logs.event("stage_saved", stage=stage.name, step=stage.start_step + stage.steps,
                   path=str(out.relative_to(run.run_dir)))


class Checkpointer:
    """Saves a stage's checkpoints into the store: every N steps / M minutes, at the steps branches
    start from, on a stop request (then stops the run), and at the stage's end."""

    def __init__(self, run: RunContext, stage: ResolvedStage, store: StageStore, pins: set[int],
                 stop: StopRequest, stop_after: int | None, hint: str) -> None:
        self.run, self.stage, self.store, self.pins = run, stage, store, pins
        self.stop, self.stop_after, self.hint = stop, stop_after, hint
        self.config = run.plan.checkpoint
        self.last_save = time.monotonic()
        self.kept: dict[str, int] = {}  # role ("start", "best") -> step: states rollbacks go back to

    def __call__(self, step: int, capture: Callable[[], dict[str, Any]]) -> None:
        global_step = self.stage.start_step + step
        stopping = self.stop.requested or (self.stop_after is not None and global_step >= self.stop_after)
        every = self.config.every is not None and step % self.config.every == 0
        timely = self.config.minutes is not None and time.monotonic() - self.last_save >= self.config.minutes * 60
        if every or timely or step in self.pins or stopping:
            self._save(self.store.step_dir(step), capture(), step)
            self._prune()
        if stopping:
            how = f"signal {self.stop.signal}" if self.stop.signal is not None else "request"
            raise RunStopped(f"stopped by {how} at step {step} of stage '{self.stage.name}' (plan step "
                             f"{global_step}); checkpoint saved. Resume with: {self.hint}",
                             code=128 + (self.stop.signal or 2))

    def save(self, step: int, capture: Callable[[], dict[str, Any]], keep: str | None = None) -> None:
        self._save(self.store.step_dir(step), capture(), step)
        if keep is not None:
            self.keep(keep, step)
        self._prune()

    def keep(self, role: str, step: int) -> None:
        self.kept[role] = step

    def steps(self) -> list[int]:
        return self.store.steps()

    def load(self, step: int) -> dict[str, Any]:
        try:
            loaded, _ = load_checkpoint(self.store.step_dir(step), self.store.key, self.run.model)
        except InvalidCheckpoint as e:
            raise RunStopped(f"cannot go back to step {step} of stage '{self.stage.name}': {e}", code=1) from None
        return loaded

    def save_final(self, state: dict[str, Any], summary: StageSummary) -> None:
        self._save(self.store.final_dir, state, summary.steps, summary=dataclasses.asdict(summary))
        self._prune()

    def _prune(self) -> None:
        self.store.prune(self.config.keep, self.pins | set(self.kept.values()))

    def _save(self, directory: Path, state: dict[str, Any], step: int, **meta: Any) -> None:
        try:
            save_checkpoint(directory, self.run.model, state,
                            {"key": self.store.key, "stage": self.stage.name, "step": step, **meta})
        except CheckpointWriteError as e:
            raise RunStopped(f"{e}; the previous checkpoint is intact. Free space, then resume with: {self.hint}",
                             code=1) from None
        self.last_save = time.monotonic()
        self.run.logs.event("checkpoint_saved", stage=self.stage.name, step=self.stage.start_step + step,
                            stage_step=step, final=directory.name == "final")


def generate_sample(run: RunContext) -> str:
    cfg = run.plan.sample
    assert cfg is not None
    tok = run.data.tokenizer
    ids = tok.encode(cfg.prompt).ids if cfg.prompt else [eos_id(tok)]
    gen = torch.Generator(device=run.device).manual_seed(run.plan.seed)
    with run.autocast() if run.device.type == "cuda" else contextlib.nullcontext():  # batch 1: fp32 is faster on CPU
        out = sample(run.model, torch.tensor([ids], device=run.device), cfg.max_tokens,
                     context_length(run.model), cfg.temperature, cfg.top_k, generator=gen)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
