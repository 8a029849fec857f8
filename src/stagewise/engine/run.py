"""A whole plan: setup (data, model, resolved stages: everything checked before training) ->
train the stages in order, handing the weights and, when asked, the optimizer state on ->
cleanup (summary, sample)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console
from transformers import PreTrainedModel

from stagewise.data.prepare import PreparedData, prepare_data
from stagewise.data.tokenizers import eos_id, save_tokenizer, to_transformers
from stagewise.engine.context import RunContext
from stagewise.engine.device import autocast_factory, resolve_device, resolve_precision, seed_everything
from stagewise.engine.loop import train_stage
from stagewise.errors import UserError
from stagewise.models.build import DropoutControl, build_model, context_length
from stagewise.models.generate import sample
from stagewise.optim.optimizers import apply_settings, build_optimizer
from stagewise.plan.resolve import ResolvedStage, resolve_stages
from stagewise.plan.schema import Plan
from stagewise.track.logs import RunLogs
from stagewise.track.progress import ProgressView, StageSummary

_PLAN_KEYS = ("model", "tokenizer", "data", "stages", "device", "sample")


@dataclass
class Prepared:
    """A plan with its data, model and stages settled: nothing left that could fail as bad input."""

    plan: Plan
    plan_path: Path
    data: PreparedData
    model: PreTrainedModel
    stages: list[ResolvedStage]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def prepare(plan: Plan, plan_path: Path, cache_root: Path) -> Prepared:
    try:
        data = prepare_data(plan.data, plan.tokenizer, plan_path.parent, cache_root)
        seed_everything(plan.seed)  # the model's initial weights come from the plan's seed
        model = build_model(plan.model, data.vocab_size, eos_id(data.tokenizer), plan_path.parent)
        stages = resolve_stages(plan, len(data.train), context_length(model), where=str(plan_path))
        resolve_device(plan.device)
    except UserError as e:
        if e.where.split(".")[0].split("[")[0] in _PLAN_KEYS:  # a key path: name the plan file too
            raise UserError(f"{plan_path}: {e.where}", e.message) from None
        raise
    for stage in stages:
        if len(data.val) - 1 < stage.block_size:
            raise UserError(f"{plan_path}: data.val", f"the validation split has {len(data.val)} tokens: "
                                                      f"too few for one sequence of {stage.block_size} "
                                                      f"(stage '{stage.name}')")
    return Prepared(plan, plan_path, data, model, stages)


def train(prepared: Prepared, run_dir: Path, fresh: bool = False, console: Console | None = None) -> list[StageSummary]:
    plan, model = prepared.plan, prepared.model
    if run_dir.exists() and any(run_dir.iterdir()):
        if not fresh:
            raise UserError(str(run_dir), "run directory is not empty: pass --fresh to start over, or --out DIR")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "plan.yaml").write_text(yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False))
    save_tokenizer(prepared.data.tokenizer, run_dir)

    device = resolve_device(plan.device)
    model.to(device)
    run = RunContext(
        plan=plan, run_dir=run_dir, model=model,
        forward=torch.compile(model) if plan.compile else model,
        device=device, autocast=autocast_factory(device, resolve_precision(plan.precision, device)),
        data=prepared.data, dropout=DropoutControl(model), logs=RunLogs(run_dir),
        view=ProgressView(prepared.total_steps, console))
    summaries: list[StageSummary] = []
    try:
        dtype = resolve_precision(plan.precision, device)
        run.logs.event("plan_start", plan=plan.name, device=str(device),
                       precision="fp32" if dtype is None else str(dtype).removeprefix("torch."),
                       parameters=sum(p.numel() for p in model.parameters()),
                       stages=[{"name": s.name, "parent": s.parent, "start_step": s.start_step, "steps": s.steps,
                                "tokens_per_step": s.tokens_per_step} for s in prepared.stages])
        optimizer: torch.optim.Optimizer | None = None
        for stage in prepared.stages:
            optimizer = _hand_off(run, stage, optimizer)
            summary = train_stage(run, stage, optimizer)
            _save_stage(run, stage)
            summaries.append(summary)
            run.logs.event("stage_end", stage=stage.name, step=stage.start_step + stage.steps,
                           seconds=round(summary.seconds, 3), train_loss=summary.train_loss,
                           val_loss=summary.val_loss)
        run.logs.event("plan_end", plan=plan.name)
    except KeyboardInterrupt:
        run.logs.event("plan_interrupted", plan=plan.name)
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


def _hand_off(run: RunContext, stage: ResolvedStage, previous: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
    """Keep the parent's optimizer state when the stage carries it; otherwise start fresh and say why."""
    if previous is not None and stage.carry:
        apply_settings(previous, stage.optimizer, stage.optimizer_settings, l1=stage.config.regularization.l1)
        run.logs.event("optimizer_carried", stage=stage.name, step=stage.start_step, optimizer=stage.optimizer)
        return previous
    if stage.parent is None:
        reason = "first stage"
    elif stage.config.optimizer.carry:
        reason = "carry asked for, but the optimizer changed: state cannot carry across optimizers"
    else:
        reason = "carry not asked for"
    run.logs.event("optimizer_reset", stage=stage.name, step=stage.start_step, optimizer=stage.optimizer,
                   reason=reason)
    return build_optimizer(stage.optimizer, stage.optimizer_settings, run.model,
                           l1=stage.config.regularization.l1)


def _save_stage(run: RunContext, stage: ResolvedStage) -> None:
    """The stage's final weights in safetensors, as a directory `from_pretrained` loads."""
    out = run.run_dir / "stages" / stage.name
    run.model.save_pretrained(out)
    to_transformers(run.data.tokenizer).save_pretrained(out)
    run.logs.event("stage_saved", stage=stage.name, step=stage.start_step + stage.steps,
                   path=str(out.relative_to(run.run_dir)))


def generate_sample(run: RunContext) -> str:
    cfg = run.plan.sample
    assert cfg is not None
    tok = run.data.tokenizer
    ids = tok.encode(cfg.prompt).ids if cfg.prompt else [eos_id(tok)]
    gen = torch.Generator(device=run.device).manual_seed(run.plan.seed)
    with run.autocast():
        out = sample(run.model, torch.tensor([ids], device=run.device), cfg.max_tokens,
                     context_length(run.model), cfg.temperature, cfg.top_k, generator=gen)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
