"""Setup of a whole plan: its data, its models and its stages, settled and checked before anything
trains (torchtune's recipes validate the config against what it builds before running). What
comes out is one `Stage` per plan stage, in a tree: nothing left that could fail as bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.config.plan_config import Plan
from stagewise.data.mixture import MixedData
from stagewise.data.prepared_data import PreparedData, prepare_data
from stagewise.data.tokenizers import eos_id
from stagewise.engine.callbacks import callback_identity
from stagewise.engine.checkpoint import StageStore
from stagewise.engine.device import resolve_compile, resolve_device, resolve_precision, seed_everything
from stagewise.engine.sharded import check_sharded
from stagewise.engine.utilization import device_memory
from stagewise.errors import UserError
from stagewise.models.build import apply_liger, checkpoint_activations, context_length, set_attention
from stagewise.optim.layers import StageLayers
from stagewise.plan.model_keys import check_model_keys
from stagewise.plan.resolve import resolve_stages
from stagewise.plan.resolved import ResolvedStage, StageData
from stagewise.plan.stage_setup import plan_corpus, setup_stages
from stagewise.plan.tree import StageNode, stage_tree
from stagewise.tasks.chat import plan_template, special_tokens
from stagewise.tasks.lm import build_lm
from stagewise.tasks.spec import StageSetup, TaskSpec
from stagewise.tasks.user_task import UserParts, check_vocab, model_fingerprint

_PLAN_KEYS = ("model", "tokenizer", "data", "stages", "device", "sample", "chat_template", "callbacks")


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage of the plan: its resolved numbers (config, steps, optimizer, key: plan.resolve),
    its task, data and model (plan.stage_setup), its layers, and its parent stage."""

    resolved: ResolvedStage
    setup: StageSetup
    layers: StageLayers  # its trainable parameters and LR multiples
    parent: Stage | None  # None: a root, which starts from the plan's model as built

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def key(self) -> str:
        return self.resolved.key

    @property
    def model(self) -> nn.Module:
        return self.setup.model

    @property
    def spec(self) -> TaskSpec:
        return self.setup.spec


@dataclass
class Prepared:
    plan: Plan
    plan_path: Path
    data: PreparedData | None  # the plan's token streams and tokenizer (None with a word tokenizer)
    stages: list[Stage]
    cache_root: Path  # token cache and stage store
    root: nn.Module  # the plan's model: what a root stage starts from
    initial: dict[str, torch.Tensor] | None  # its weights as built, when a `from: init` stage needs them
    compiled: bool  # the plan's `compile`, auto settled (engine.device)
    dtype: torch.dtype | None  # its `precision`: the autocast dtype, None for fp32

    @property
    def resolved(self) -> list[ResolvedStage]:
        return [s.resolved for s in self.stages]

    @property
    def total_steps(self) -> int:
        return sum(s.resolved.steps for s in self.stages)

    def store(self, stage: Stage) -> StageStore:
        return StageStore(self.cache_root, stage.key)


def prepare(plan: Plan, plan_path: Path, cache_root: Path, parts: UserParts | None = None) -> Prepared:
    """`parts`: a Python caller's model, rows and loss (tasks.user_task); a model passed in takes
    the place of the plan's and is trained in place; it takes part in the stage keys by its fingerprint."""
    own_model = parts.model if parts is not None else None
    try:
        nodes = stage_tree(plan)
        device = resolve_device(plan.device)
        if parts is not None:
            parts.check([n.name for n in nodes])
        if own_model is None:
            check_model_keys(plan, device_memory(device))  # before any data is read or model built
        lm_data = lm = template = None
        compiled = False
        if plan.tokenizer.kind != "word":  # a transformers causal LM and its token streams
            tok = plan.tokenizer
            template = plan_template(plan.chat_template, plan_path.parent, tok.path,
                                     special_tokens(tok.kind, tok.path, plan_path.parent))
            lm_data = prepare_data(plan.data, plan.tokenizer, plan_path.parent, cache_root, seed=plan.seed,
                                   corpus=plan_corpus(plan, nodes, template, plan_path.parent))
        seed_everything(plan.seed)  # the model's initial weights come from the plan's seed
        if lm_data is not None:
            lm = (build_lm(plan.model, lm_data.vocab_size, eos_id(lm_data.tokenizer), plan_path.parent)
                  if own_model is None else check_vocab(own_model, lm_data.vocab_size))
            compiled = resolve_compile(plan, device, lm, len(lm_data.train), context_length(lm))
            set_attention(lm, plan.model.attention, compiled, device)
            if plan.model.activation_checkpointing:
                checkpoint_activations(lm, plan.model.arch or str(plan.model.pretrained))
            if plan.model.liger:
                apply_liger(lm, device)
        elif plan.model.activation_checkpointing or plan.model.liger:
            key = "activation_checkpointing" if plan.model.activation_checkpointing else "liger"
            raise UserError(f"model.{key}", "for causal LMs (a plan with a word tokenizer builds small task models)")
        setups = setup_stages(plan, nodes, lm_data, lm, plan_path.parent, template, cache_root, parts)
        _check_handoffs(nodes, setups)
        dtype = resolve_precision(plan.precision, device, lm if lm is not None else setups[0].model)
        identity: dict[str, Any] = {"model": plan.model.model_dump(mode="json", exclude={"activation_checkpointing"})
                                    if own_model is None else {"object": model_fingerprint(own_model)},
                                    "tokenizer": plan.tokenizer.model_dump(mode="json"),
                                    "data": lm_data.fingerprint if lm_data else None, "seed": plan.seed,
                                    "precision": str(dtype)}
        if plan.callbacks:  # they may change what a stage trains to (a veto, a changed LR): only then in the keys
            identity["callbacks"] = [callback_identity(use, i) for i, use in enumerate(plan.callbacks)]
        layers = [StageLayers(s.model, n.config.layers.freeze, n.config.layers.unfreeze, n.config.layers.lr_factor,
                              n.where, s.adapter.trainable(s.model) if s.adapter is not None else None)
                  for n, s in zip(nodes, setups, strict=True)]
        sizes = [StageData(s.n_train, s.unit, s.fingerprint) for s in setups]
        resolved = resolve_stages(nodes, sizes, context_length(lm) if lm is not None else None, identity,
                                  where=str(plan_path), checkpoint_every=plan.checkpoint.every)
    except UserError as e:
        if e.where.split(".")[0].split("[")[0] in _PLAN_KEYS:  # a key path: name the plan file too
            raise UserError(f"{plan_path}: {e.where}", e.message) from None
        raise
    stages: list[Stage] = []
    for node, r, setup, layer in zip(nodes, resolved, setups, layers, strict=True):
        stages.append(Stage(r, setup, layer, stages[node.parent.index] if node.parent is not None else None))
    if lm_data is not None:
        for stage in stages:
            if stage.resolved.unit == "tokens" and len(lm_data.val) - 1 < stage.resolved.block_size:
                raise UserError(f"{plan_path}: data.val", f"the validation split has {len(lm_data.val)} tokens: too "
                                                          f"few for one sequence of {stage.resolved.block_size} "
                                                          f"(stage '{stage.name}')")
            if isinstance(stage.setup.data, MixedData):
                stage.setup.data.check_windows(stage.resolved.block_size, f"{plan_path}: {stage.resolved.node.where}.data")
    root = lm if lm is not None else setups[0].model
    initial = ({k: v.detach().clone() for k, v in root.state_dict().items()}
               if any(n.from_init for n in nodes) else None)
    prepared = Prepared(plan, plan_path, lm_data, stages, cache_root, root, initial, compiled, dtype)
    check_sharded(prepared)  # what fsdp does not do yet: one line at check time, not mid-run
    return prepared


def _check_handoffs(nodes: list[StageNode], setups: list[StageSetup]) -> None:
    """Optimizer state goes on only over the same parameters: the same model, the same layers."""
    for node, setup in zip(nodes, setups, strict=True):
        handoff = node.config.optimizer.handoff
        if handoff == "reset" or node.parent is None:  # a root with a hand-off is refused in resolve
            continue
        parent = setups[node.parent.index]
        if setup.model is not parent.model:
            trains = "a new head" if setup.head else "other parameters (a new adapter, or merged weights)"
            raise UserError(f"{node.where}.optimizer.handoff", f"{handoff} needs the parent's model; this stage "
                                                               f"trains {trains} (use reset)")
        if handoff == "carry" and node.config.layers != node.parent.config.layers:
            raise UserError(f"{node.where}.optimizer.handoff", "carry needs the parent's layers settings (the "
                                                               "optimizer's parameter groups); use reset or convert")
