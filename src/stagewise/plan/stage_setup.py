"""Each stage's data and model, settled before anything trains, by walking the stage tree.

A stage trains its parent's model when the two tasks are of one family (causal_lm and sft train a
causal LM; classify, seq2seq and tag each their own model). A root (the first stage, or
`from: init`) trains the plan's `model` as built: the causal LM when the plan's tokenizer is not
`word`, else the model its task builds from `model.arch`. A task that `heads_on_lm` (classify,
after a causal LM) gets a new head whose backbone weights carry over when the stage starts.

Data: a stage reads its own `data` or else the plan's; what each task reads is its spec's
(tasks.registry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import Plan
from stagewise.config.registry import TASKS
from stagewise.data.prepared_data import PreparedData
from stagewise.data.sources import Corpus, data_file_keys
from stagewise.errors import UserError
from stagewise.models.adapters import stage_model
from stagewise.models.build import context_length
from stagewise.models.heads import carry_weights
from stagewise.plan.tree import StageNode
from stagewise.tasks.chat import ChatTemplate
from stagewise.tasks.spec import LM_FAMILY, TASK_DATA_KEYS, StageInput, StageSetup, TaskSpec, task_spec
from stagewise.tasks.user_task import UserParts


def setup_stages(plan: Plan, nodes: list[StageNode], lm_data: PreparedData | None, lm: nn.Module | None,
                 plan_dir: Path, template: ChatTemplate | None = None, cache_root: Path | None = None,
                 parts: UserParts | None = None) -> list[StageSetup]:
    """Every stage's data and model, in plan order. `lm_data`/`lm`: the plan's token streams and
    causal LM, when its tokenizer is not `word`; the plan's model is then that LM, and `template`
    its chat template (tasks.chat). `cache_root`: the token cache's (a stage's own mixture).
    `parts`: a Python caller's model, rows and loss (tasks.user_task)."""
    _check_fields({task_spec(n.config.task) for n in nodes if n.config.data is None} or {task_spec("causal_lm")},
                  plan.data, "data")
    setups: list[StageSetup] = []
    prepared: dict[str, tuple[Any, str]] = {}  # data of equal (task, data config), prepared once
    # The stage before the first: what a root stage starts from.
    root = None if lm is None else StageSetup(task_spec("causal_lm"), lm_data, "", lm, lm_based=True, chat=template)
    for node in nodes:
        cfg, spec = node.config, task_spec(node.config.task)
        spec.check_metrics(cfg.eval, node.where)
        parent = setups[node.parent.index] if node.parent is not None else root
        lm_based = spec.uses_lm_tokenizer(parent, plan)
        data_cfg = cfg.data or plan.data
        rows = id(parts.data_for(node.name)) if parts is not None else None  # a stage's own rows: its own data
        key = json.dumps([cfg.task, data_cfg.model_dump(mode="json"), lm_based, rows], sort_keys=True)
        if key not in prepared:
            where = f"{node.where}.data" if cfg.data is not None else "data"
            with data_file_keys(data_cfg, plan_dir, where):  # a bad file also names the plan key
                prepared[key] = _prepare(spec, StageInput(data_cfg, where, cfg.data is not None, plan, plan_dir,
                                                          lm_data, lm_based, template if lm_based else None,
                                                          cache_root, node.name, parts))
        data, fingerprint = prepared[key]
        if parent is None:  # a plan of the tasks' own models: the first stage's task builds it
            parent = root = StageSetup(spec, data, fingerprint, spec.root_model(plan.model, data), lm_based=False)
        setup = _child(spec, parent, data, fingerprint, lm_based, node, plan, plan_dir)
        _check_labels(setup, parent, node.where)
        if lm_based:
            _check_length(spec, data, setup.model, f"{node.where}.data" if cfg.data is not None else "data")
        setups.append(setup)
    return setups


def plan_corpus(plan: Plan, nodes: list[StageNode], template: ChatTemplate, plan_dir: Path) -> Corpus | None:
    """The texts of the plan's data for its tokenizer and token streams, as the first stage that
    reads the plan's data reads them (None: as text, data.sources)."""
    first = next((n for n in nodes if n.config.data is None), None)
    if first is None:
        return None
    return task_spec(first.config.task).plan_corpus(plan.data, plan_dir, plan.seed, template)


def _prepare(spec: TaskSpec, inp: StageInput) -> tuple[Any, str]:
    if inp.own:  # the plan's data serves several tasks: setup_stages checks it as a whole
        _check_fields({spec}, inp.config, inp.where)
    kind = inp.plan.tokenizer.kind
    if spec.traits.family == LM_FAMILY and kind == "word":
        raise UserError("tokenizer.kind", f"{spec.name} trains a causal LM: kind char, byte, bpe or pretrained, not word")
    if kind != "word" and not inp.lm_based:
        raise UserError("tokenizer.kind", f"the built-in {spec.name} models read words: set kind: word")
    if inp.config.mix is not None and not spec.traits.mixes:
        which = ", ".join(t.name for t in TASKS.values() if t.traits.mixes)
        raise UserError(f"{inp.where}.mix", f"a {spec.name} stage reads one data set (stages of {which} read a mix)")
    return spec.prepare(inp)


def _pretrained_name(plan: Plan, plan_dir: Path) -> str | None:
    """The plan's pretrained model as an adapter's config names its base: a local directory's full path."""
    name = plan.model.pretrained
    if name is None:
        return None
    local = (plan_dir / name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _child(spec: TaskSpec, parent: StageSetup, data: Any, fingerprint: str, lm_based: bool, node: StageNode,
           plan: Plan, plan_dir: Path) -> StageSetup:
    where, adapter = node.where, node.config.adapter
    if adapter is not None and not spec.traits.takes_adapters:
        which = ", ".join(t.name for t in TASKS.values() if t.traits.takes_adapters)
        raise UserError(f"{where}.adapter", f"a {spec.name} stage trains no adapter (stages of {which} do)")
    if spec.traits.family == parent.spec.traits.family:
        if not spec.traits.takes_adapters:
            return StageSetup(spec, data, fingerprint, parent.model, lm_based, chat=parent.chat)
        model, step = stage_model(parent.model, parent.adapter, node.parent.name if node.parent else None,
                                  _pretrained_name(plan, plan_dir), adapter, where)
        return StageSetup(spec, data, fingerprint, model, lm_based, chat=parent.chat, adapter=step)
    if parent.adapter is not None and parent.adapter.lora is not None:
        raise UserError(f"{where}.task", f"a {spec.name} stage cannot follow an adapter stage: a stage without "
                                         "adapter between them merges it")
    if spec.traits.heads_on_lm and parent.spec.traits.family == LM_FAMILY:
        return StageSetup(spec, data, fingerprint, spec.head_model(parent.model, data, f"{where}.task"), lm_based,
                          head=True)
    raise UserError(f"{where}.task", f"a {spec.name} stage cannot follow a {parent.task} stage (a {spec.name} "
                                     f"model can be built from: {', '.join(spec.can_follow())})")


def _check_labels(setup: StageSetup, parent: StageSetup, where: str) -> None:
    """A classifier (or tagger) continued from one keeps its labels."""
    if parent.model is not setup.model or parent.data is setup.data or setup.labels is None:
        return
    if setup.labels != parent.labels:
        raise UserError(f"{where}.data", f"labels {setup.labels} differ from the parent stage's {parent.labels}")


def _check_length(spec: TaskSpec, data: Any, model: nn.Module, where: str) -> None:
    """Examples fed to a causal LM (or a head on one) must fit its positions."""
    longest = spec.longest_example(data)
    limit = context_length(model)
    if longest is not None and longest > limit:
        raise UserError(f"{where}.max_len", f"examples are up to {longest} tokens, more than the model's context "
                                            f"length {limit}: set max_len <= {limit}")


def carry_head(setup: StageSetup, parent_model: nn.Module, where: str) -> int:
    """Put the parent LM's backbone weights into the head model (at the stage's start)."""
    return carry_weights(parent_model.base_model, setup.model.base_model, where)  # type: ignore[arg-type]


def _check_fields(specs: set[TaskSpec], cfg: DataConfig, where: str) -> None:
    """A data key that none of the tasks reading this data uses is a mistake."""
    used = set().union(*(s.traits.data_keys for s in specs))
    names = sorted(s.name for s in specs)
    for key in sorted(cfg.model_fields_set & TASK_DATA_KEYS - used):
        raise UserError(f"{where}.{key}", f"not used by task{'s' if len(names) > 1 else ''} {', '.join(names)}")
