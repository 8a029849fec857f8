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
from torch import nn

from stagewise.data.prepare import PreparedData, prepare_data
from stagewise.data.tokenizers import eos_id, save_tokenizer
from stagewise.engine.checkpoint import (CheckpointWriteError, InvalidCheckpoint, StageStore, load_checkpoint,
                                         save_checkpoint)
from stagewise.engine.context import RunContext
from stagewise.engine.device import (autocast_factory, resolve_compile, resolve_device, resolve_precision,
                                     resolve_threads, seed_everything, settings_line)
from stagewise.engine.loop import train_stage
from stagewise.engine.signals import StopRequest
from stagewise.errors import RunStopped, UserError
from stagewise.models.build import build_model, context_length, set_attention
from stagewise.models.generate import sample
from stagewise.optim.handoff import SwatsEstimate, convert_adam_to_sgd, swats_lr
from stagewise.optim.layers import StageLayers
from stagewise.optim.optimizers import apply_settings, build_optimizer
from stagewise.plan.resolve import ResolvedStage, StageData, pinned_steps, resolve_stages
from stagewise.plan.schema import ADAM, Plan
from stagewise.tasks.base import Task
from stagewise.tasks.export import labels_of, save_stage
from stagewise.tasks.setup import LM_TASKS, StageSetup, carry_head, make_task, setup_stages
from stagewise.track.logs import RunLogs, started_threads
from stagewise.track.progress import ProgressView, StageSummary

_PLAN_KEYS = ("model", "tokenizer", "data", "stages", "device", "sample")


@dataclass
class Prepared:
    """A plan with its data, model and stages settled: nothing left that could fail as bad input."""

    plan: Plan
    plan_path: Path
    data: PreparedData | None  # the plan's token streams and tokenizer (None with a word tokenizer)
    setups: list[StageSetup]  # each stage's data and model, by stage index
    stages: list[ResolvedStage]
    cache_root: Path  # token cache and stage store
    layers: list[StageLayers]  # each stage's trainable parameters and LR multiples, by stage index
    root: nn.Module  # the plan's model: what a first or `from: init` stage starts from
    initial: dict[str, torch.Tensor] | None  # its weights as built, when a stage starts `from: init`
    compiled: bool  # the plan's `compile`, auto settled (engine.device)
    dtype: torch.dtype | None  # its `precision`: the autocast dtype, None for fp32

    def model(self, stage: ResolvedStage) -> nn.Module:
        return self.setups[stage.index].model

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def store(self, stage: ResolvedStage) -> StageStore:
        return StageStore(self.cache_root, stage.key)


def prepare(plan: Plan, plan_path: Path, cache_root: Path) -> Prepared:
    try:
        lm_data = lm = None
        compiled = False
        if plan.tokenizer.kind != "word":  # a transformers causal LM and its token streams
            lm_data = prepare_data(plan.data, plan.tokenizer, plan_path.parent, cache_root, seed=plan.seed)
        seed_everything(plan.seed)  # the model's initial weights come from the plan's seed
        device = resolve_device(plan.device)
        if lm_data is not None:
            lm = build_model(plan.model, lm_data.vocab_size, eos_id(lm_data.tokenizer), plan_path.parent)
            compiled = resolve_compile(plan, device, lm, len(lm_data.train), context_length(lm))
            set_attention(lm, plan.model.attention, compiled, device)
        setups = setup_stages(plan, lm_data, lm, plan_path.parent)
        _check_handoffs(plan, setups)
        dtype = resolve_precision(plan.precision, device, lm if lm is not None else setups[0].model)
        identity = {"model": plan.model.model_dump(mode="json"), "tokenizer": plan.tokenizer.model_dump(mode="json"),
                    "data": lm_data.fingerprint if lm_data else None, "seed": plan.seed,
                    "precision": str(dtype)}
        layers = [StageLayers(s.model, c.layers.freeze, c.layers.unfreeze, c.layers.lr_factor, f"stages[{i}]")
                  for i, (c, s) in enumerate(zip(plan.stages, setups, strict=True))]
        sizes = [StageData(s.n_train, s.unit, s.fingerprint) for s in setups]
        stages = resolve_stages(plan, sizes, context_length(lm) if lm is not None else None, identity,
                                where=str(plan_path))
    except UserError as e:
        if e.where.split(".")[0].split("[")[0] in _PLAN_KEYS:  # a key path: name the plan file too
            raise UserError(f"{plan_path}: {e.where}", e.message) from None
        raise
    for stage in stages:
        if stage.unit == "tokens" and len(lm_data.val) - 1 < stage.block_size:  # type: ignore[union-attr]
            raise UserError(f"{plan_path}: data.val", f"the validation split has {len(lm_data.val)} tokens: "  # type: ignore[union-attr]
                                                      f"too few for one sequence of {stage.block_size} "
                                                      f"(stage '{stage.name}')")
    root = lm if lm is not None else setups[0].model
    initial = ({k: v.detach().clone() for k, v in root.state_dict().items()}
               if any(c.from_ == "init" for c in plan.stages) else None)
    return Prepared(plan, plan_path, lm_data, setups, stages, cache_root, layers, root, initial, compiled, dtype)


def _check_handoffs(plan: Plan, setups: list[StageSetup]) -> None:
    """Optimizer state goes on only over the same parameters: the same model, the same layers."""
    by_name = {cfg.name: (cfg, setup) for cfg, setup in zip(plan.stages, setups, strict=True)}
    for i, (cfg, setup) in enumerate(zip(plan.stages, setups, strict=True)):
        handoff = cfg.optimizer.handoff
        if handoff == "reset" or cfg.from_ == "init":
            continue
        parent_cfg, parent = by_name[(cfg.from_ or "").partition("@")[0] or plan.stages[i - 1].name]
        if setup.model is not parent.model:
            raise UserError(f"stages[{i}].optimizer.handoff", f"{handoff} needs the parent's model; this stage "
                                                             "trains a new head (use reset)")
        if handoff == "carry" and cfg.layers != parent_cfg.layers:
            raise UserError(f"stages[{i}].optimizer.handoff", "carry needs the parent's layers settings (the "
                                                             "optimizer's parameter groups); use reset or convert")


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
    models = list({id(s.model): s.model for s in prepared.setups}.values())
    for model in models:
        model.to(device)
    run = RunContext(plan=plan, run_dir=run_dir, device=device, autocast=autocast_factory(device, dtype),
                     logs=RunLogs(run_dir), view=ProgressView(prepared.total_steps, console))
    tasks: dict[tuple[int, int, str, int], Task] = {}  # one per model and data: a compiled loss is compiled once
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
                                "key": s.key} for s in prepared.stages])
        run.view.print(settings_line(device, dtype, prepared.compiled, threads, plan))
        with StopRequest() as stop:
            state = _InMemory()
            pins = pinned_steps(prepared.stages)
            for stage in prepared.stages:
                setup = prepared.setups[stage.index]
                task_key = (id(setup.model), id(setup.data), setup.task, stage.config.eval.beam)
                if task_key not in tasks:
                    tasks[task_key] = make_task(setup, stage.config, stage.config.data or plan.data, device,
                                                run.autocast, prepared.compiled)
                checkpointer = Checkpointer(run, stage, setup.model, prepared.store(stage), pins[stage.name], stop,
                                            stop_after, hint)
                summaries.append(_run_stage(run, prepared, stage, tasks[task_key], state, checkpointer))
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
    last = prepared.setups[-1]
    if plan.sample is not None and last.task in LM_TASKS and prepared.data is not None:
        run.view.print(f"sample:\n{generate_sample(run, last.model, prepared.data)}")
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


def _run_stage(run: RunContext, prepared: Prepared, stage: ResolvedStage, task: Task, state: _InMemory,
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
            _export(run, prepared, stage, store, state)
            return summary
        missing = checkpointer.pins - set(store.steps())
        resume = _resume_point(run, store, task.model, limit=min(missing, default=stage.steps))
        if resume is None:
            _load_parent(run, prepared, stage, state)
        layers = prepared.layers[stage.index]
        optimizer, start_lr = _hand_off(run, stage, task.model, layers, state, resuming=resume is not None)
        resumed_at = resume["progress"]["step"] if resume is not None else 0
        if resume is not None:
            run.logs.event("stage_resumed", stage=stage.name, step=stage.start_step + resumed_at, stage_step=resumed_at)
        attempt = resume["control"]["memory"]["attempt"] if resume is not None else 0
        run.logs.metrics.keep_only(lambda r: _logged_before(r, stage, resumed_at, attempt))
        outcome = train_stage(run, stage, task, layers, optimizer, checkpointer, resume,
                              track_swats=stage.track_swats, start_lr=start_lr)
        summary = outcome.summary
        checkpointer.save_final(outcome.final_state, summary)
        state.hold((stage.key, None), stage, outcome.final_state, outcome.optimizer)
        run.logs.event("stage_end", stage=stage.name, step=stage.start_step + stage.steps,
                       seconds=round(summary.seconds, 3), train_loss=summary.train_loss, val_loss=summary.val_loss)
        _export(run, prepared, stage, store, state)
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


def _resume_point(run: RunContext, store: StageStore, model: nn.Module, limit: int) -> dict[str, Any] | None:
    """Load the newest intact checkpoint at or before `limit` (weights into the model); a broken
    one is reported in one line and the one before it is used."""
    for step in reversed(store.steps()):
        if step > limit:
            continue
        try:
            loaded, _ = load_checkpoint(store.step_dir(step), store.key, model)
            return loaded
        except InvalidCheckpoint as e:
            run.logs.event("checkpoint_invalid", key=store.key, step=step, reason=str(e))
            run.view.print(f"warning: {e}; using the checkpoint before it")
    return None


def _load_parent(run: RunContext, prepared: Prepared, stage: ResolvedStage, state: _InMemory) -> None:
    """Put the parent's state (its end, or the step a branch starts from) into the model; for a
    new head, then carry the parent LM's backbone into it."""
    setup = prepared.setups[stage.index]
    if stage.parent is None:  # the plan's model as built (or loaded) by `prepare`
        parent_model = prepared.root
        if state.marker is not None:  # a `from: init` stage after others have trained it
            assert prepared.initial is not None
            parent_model.load_state_dict(prepared.initial)
            state.marker, state.optimizer, state.optimizer_state = None, None, None
    else:
        parent = next(s for s in prepared.stages if s.name == stage.parent)
        parent_model = prepared.model(parent)
        marker = (parent.key, stage.parent_step)
        if state.marker != marker:
            store = prepared.store(parent)
            directory = store.final_dir if stage.parent_step is None else store.step_dir(stage.parent_step)
            try:
                loaded, _ = load_checkpoint(directory, parent.key, parent_model)
            except InvalidCheckpoint as e:
                raise RunStopped(f"cannot start stage '{stage.name}': its parent checkpoint is unusable: {e}; "
                                 "rerun with --fresh to retrain", code=2) from None
            state.hold(marker, parent, loaded)
    if setup.head:
        carried = carry_head(setup, parent_model, f"stages[{stage.index}].task")
        run.logs.event("head_attached", stage=stage.name, step=stage.start_step, carried_tensors=carried,
                       classes=len(setup.data.label_map))


def _hand_off(run: RunContext, stage: ResolvedStage, model: nn.Module, layers: StageLayers,
              state: _InMemory, resuming: bool) -> tuple[torch.optim.Optimizer, float | None]:
    """The stage's optimizer and what it takes from the parent's: its state (carry), Adam's
    moment as SGD's momentum (convert), or nothing (reset); always logged, with the reason. And
    the LR to start from when it is only known now (lr auto), else None. `resuming`: the stage
    continues from its own checkpoint, which train_stage loads into the optimizer."""
    l1 = stage.config.regularization.l1
    settings = dict(stage.optimizer_settings)
    where = {"stage": stage.name, "step": stage.start_step, "optimizer": stage.optimizer}
    if resuming:  # the checkpoint holds the optimizer's state and the LR (lr auto's too): only its shape is needed
        layers.hold()
        return build_optimizer(stage.optimizer, settings, model, l1=l1, lr_scales=layers.scales), None
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
    layers.hold()  # the optimizer holds every parameter the stage may train
    if parent is None and state.optimizer_state is not None and spec is not None and stage.handoff != "reset":
        parent = build_optimizer(spec["name"], spec["settings"], model, l1=l1, lr_scales=layers.scales)
        parent.load_state_dict(state.optimizer_state)
    expected = {"carry": (stage.optimizer,), "convert": ADAM, "reset": None}[stage.handoff]
    if expected is not None and spec is not None and spec["name"] not in expected:
        run.logs.event("optimizer_reset", **where, reason=f"handoff {stage.handoff} asked for, but a rule "
                                                          f"switched the parent to {spec['name']}")
        return build_optimizer(stage.optimizer, settings, model, l1=l1, lr_scales=layers.scales), start_lr
    if stage.handoff == "carry" and parent is not None:
        apply_settings(parent, stage.optimizer, settings, l1=l1)
        run.logs.event("optimizer_carried", **where)
        return parent, start_lr
    optimizer = build_optimizer(stage.optimizer, settings, model, l1=l1, lr_scales=layers.scales)
    if stage.handoff == "convert" and parent is not None:
        converted = convert_adam_to_sgd(parent, optimizer)
        run.logs.event("optimizer_converted", **where, converted_parameters=converted,
                       how="sgd momentum buffer = adam m_hat / (1 - momentum)")
        return optimizer, start_lr
    reason = "first stage" if stage.parent is None else "handoff: reset"
    run.logs.event("optimizer_reset", **where, reason=reason)
    return optimizer, start_lr


def _export(run: RunContext, prepared: Prepared, stage: ResolvedStage, store: StageStore, state: _InMemory) -> None:
    """The stage's final weights in safetensors, as a directory that can be used on its own
    (tasks.export); `stagewise.json`, written last, marks it complete."""
    out = run.run_dir / "stages" / stage.name
    marker = out / "stagewise.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == stage.key:
        return
    from transformers.utils import logging as hf_logging  # imported when a stage is saved, not with the engine

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars would interleave with ours
    setup = prepared.setups[stage.index]
    if state.marker != (stage.key, None):  # a reused stage: its weights come from the store
        loaded, _ = load_checkpoint(store.final_dir, stage.key, setup.model)
        state.hold((stage.key, None), stage, loaded)
    save_stage(setup, prepared.data.tokenizer if prepared.data else None, prepared.plan.model, out)
    marker.write_text(json.dumps({"key": stage.key, "stage": stage.name, "task": setup.task,
                                  "labels": labels_of(setup)}))
    run.logs.event("stage_saved", stage=stage.name, step=stage.start_step + stage.steps,
                   path=str(out.relative_to(run.run_dir)))


class Checkpointer:
    """Saves a stage's checkpoints into the store: every N steps / M minutes, at the steps branches
    start from, on a stop request (then stops the run), and at the stage's end."""

    def __init__(self, run: RunContext, stage: ResolvedStage, model: nn.Module, store: StageStore, pins: set[int],
                 stop: StopRequest, stop_after: int | None, hint: str) -> None:
        self.run, self.stage, self.model, self.store, self.pins = run, stage, model, store, pins
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
            loaded, _ = load_checkpoint(self.store.step_dir(step), self.store.key, self.model)
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
            save_checkpoint(directory, self.model, state,
                            {"key": self.store.key, "stage": self.stage.name, "step": step, **meta})
        except CheckpointWriteError as e:
            raise RunStopped(f"{e}; the previous checkpoint is intact. Free space, then resume with: {self.hint}",
                             code=1) from None
        self.last_save = time.monotonic()
        self.run.logs.event("checkpoint_saved", stage=self.stage.name, step=self.stage.start_step + step,
                            stage_step=step, final=directory.name == "final")


def generate_sample(run: RunContext, model: nn.Module, data: PreparedData) -> str:
    cfg = run.plan.sample
    assert cfg is not None
    tok = data.tokenizer
    ids = tok.encode(cfg.prompt).ids if cfg.prompt else [eos_id(tok)]
    gen = torch.Generator(device=run.device).manual_seed(run.plan.seed)
    with run.autocast() if run.device.type == "cuda" else contextlib.nullcontext():  # batch 1: fp32 is faster on CPU
        out = sample(model, torch.tensor([ids], device=run.device), cfg.max_tokens,
                     context_length(model), cfg.temperature, cfg.top_k, generator=gen)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
