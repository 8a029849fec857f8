"""Each stage's data and model, settled before anything trains.

A stage trains its parent's model, with two exceptions: the first stage (and every `from: init`
stage) trains the plan's `model` as built, and a `classify` stage whose parent trains a causal LM
(causal_lm or sft) puts a classification head on it: the LM's backbone weights carry over by name
(models.heads), the head starts fresh. Tasks that share a model: causal_lm and sft (a
transformers causal LM); classify (bigru, or a transformers sequence classifier such as bert);
seq2seq (the built-in `transformer`); tag (the built-in `bigru` tagger).

Data: a stage reads its own `data` or else the plan's. causal_lm and sft use the plan's tokenizer
(trained on the plan's data); the built-in models use `kind: word` vocabularies built from their
stage's training file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.data.prepare import PreparedData
from stagewise.data.tokenizers import eos_id
from stagewise.errors import UserError
from stagewise.models.bigru import BiGRUClassifier, BiGRUTagger
from stagewise.models.heads import carry_weights, classifier_from_lm
from stagewise.models.seq2seq import TransformerSeq2Seq
from stagewise.plan.schema import DataConfig, ModelConfig, Plan, StageConfig
from stagewise.tasks.base import Task
from stagewise.tasks.classify import ClassifyData, ClassifyTask, prepare_classify
from stagewise.tasks.lm import LanguageModelTask
from stagewise.tasks.records import Field
from stagewise.tasks.seq2seq import PairData, Seq2SeqTask, prepare_seq2seq
from stagewise.tasks.sft import SftData, SftTask, prepare_sft
from stagewise.tasks.tag import TagData, TagTask, prepare_tag

LM_TASKS = ("causal_lm", "sft")
BUILTIN = {"bigru": {"classify": BiGRUClassifier, "tag": BiGRUTagger}, "transformer": {"seq2seq": TransformerSeq2Seq}}
_SET_BY_DATA = {"num_classes", "num_tags", "vocab_size", "src_vocab_size", "tgt_vocab_size", "pad_id"}


@dataclass(frozen=True)
class StageSetup:
    """A stage's data and model. `head`: the model is a new head on the parent's LM, whose
    backbone weights are carried into it when the stage starts. `lm_based`: a transformers
    causal LM or a head on one (it reads the plan's tokenizer)."""

    task: str
    data: Any  # PreparedData | SftData | ClassifyData | PairData | TagData
    fingerprint: str  # of the stage's data as encoded: part of the stage key
    model: nn.Module
    lm_based: bool
    head: bool = False

    @property
    def n_train(self) -> int:
        """What a pass over the training data holds: tokens (causal_lm) or examples."""
        return len(self.data.train)

    @property
    def unit(self) -> str:
        return "tokens" if self.task == "causal_lm" else "examples"


def setup_stages(plan: Plan, lm_data: PreparedData | None, lm: nn.Module | None, plan_dir: Path) -> list[StageSetup]:
    """Every stage's data and model, in plan order. `lm_data`/`lm`: the plan's token streams and
    causal LM, when its tokenizer is not `word`; the plan's model is then that LM."""
    _check_fields({c.task for c in plan.stages if c.data is None} or {"causal_lm"}, plan.data, "data")
    setups: list[StageSetup] = []
    by_name: dict[str, StageSetup] = {}
    prepared: dict[str, tuple[Any, str]] = {}  # data of equal (task, data config), prepared once
    # The stage before the first: what a first or `from: init` stage starts from.
    init = None if lm is None else StageSetup("causal_lm", lm_data, "", lm, lm_based=True)
    for i, cfg in enumerate(plan.stages):
        where = f"stages[{i}]"
        parent_name = (cfg.from_ or "").partition("@")[0] or (plan.stages[i - 1].name if i else "init")
        parent = by_name.get(parent_name, init)
        lm_based = cfg.task in LM_TASKS or (cfg.task == "classify" and (parent is None or parent.lm_based)
                                            and plan.tokenizer.kind != "word")
        data_cfg = cfg.data or plan.data
        key = json.dumps([cfg.task, data_cfg.model_dump(mode="json"), lm_based], sort_keys=True)
        if key not in prepared:
            prepared[key] = _prepare(cfg, data_cfg, lm_data, plan, plan_dir, where, lm_based)
        data, fingerprint = prepared[key]
        if parent is None:  # a plan of built-in models: the first stage's task says which
            parent = init = StageSetup(cfg.task, data, fingerprint, _root_model(plan.model, cfg.task, data),
                                       lm_based=False)
        setup = _child(cfg, parent, data, fingerprint, lm_based, where)
        _check_labels(setup, parent, where)
        setups.append(setup)
        by_name[cfg.name] = setup
    return setups


def _child(cfg: StageConfig, parent: StageSetup, data: Any, fingerprint: str, lm_based: bool,
           where: str) -> StageSetup:
    if cfg.task == parent.task or (cfg.task in LM_TASKS and parent.task in LM_TASKS):
        return StageSetup(cfg.task, data, fingerprint, parent.model, lm_based)
    if cfg.task == "classify" and parent.task in LM_TASKS:
        model, _ = classifier_from_lm(parent.model, len(data.label_map), data.pad_id, f"{where}.task")  # type: ignore[arg-type]
        return StageSetup(cfg.task, data, fingerprint, model, lm_based, head=True)
    raise UserError(f"{where}.task", f"a {cfg.task} stage cannot follow a {parent.task} stage (a {cfg.task} "
                                     f"model can be built from: {', '.join(_can_follow(cfg.task))})")


def _can_follow(task: str) -> list[str]:
    if task in LM_TASKS:
        return list(LM_TASKS)
    return [task, *LM_TASKS] if task == "classify" else [task]


def _check_labels(setup: StageSetup, parent: StageSetup, where: str) -> None:
    """A classifier continued from a classifier keeps its labels."""
    if parent.model is not setup.model or not hasattr(setup.data, "label_map") or parent.data is setup.data:
        return
    if setup.data.label_map.labels != parent.data.label_map.labels:
        raise UserError(f"{where}.data", f"labels {list(setup.data.label_map.labels)} differ from the parent "
                                         f"stage's {list(parent.data.label_map.labels)}")


def carry_head(setup: StageSetup, parent_model: nn.Module, where: str) -> int:
    """Put the parent LM's backbone weights into the head model (at the stage's start)."""
    return carry_weights(parent_model.base_model, setup.model.base_model, where)  # type: ignore[union-attr, arg-type]


def make_task(setup: StageSetup, cfg: StageConfig, device: torch.device, autocast: Any, compile: bool) -> Task:
    if setup.task == "causal_lm":
        return LanguageModelTask(setup.model, device, autocast, setup.data, compile)
    if setup.task == "sft":
        return SftTask(setup.model, device, autocast, setup.data, setup.model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
    if setup.task == "classify":
        return ClassifyTask(setup.model, device, autocast, setup.data)
    if setup.task == "seq2seq":
        return Seq2SeqTask(setup.model, device, autocast, setup.data, cfg.eval.beam,  # type: ignore[arg-type]
                           cfg.data.max_len if cfg.data and cfg.data.max_len else 64)
    return TagTask(setup.model, device, autocast, setup.data)


# --- data ------------------------------------------------------------------------------------------


def _prepare(cfg: StageConfig, data_cfg: DataConfig, lm: PreparedData | None, plan: Plan, plan_dir: Path,
             where: str, lm_based: bool) -> tuple[Any, str]:
    data_where = f"{where}.data" if cfg.data is not None else "data"
    if cfg.data is not None:  # the plan's data serves several tasks: setup_stages checks it as a whole
        _check_fields({cfg.task}, data_cfg, data_where)
    if cfg.task in LM_TASKS and plan.tokenizer.kind == "word":
        raise UserError("tokenizer.kind", f"{cfg.task} trains a causal LM: kind char, byte, bpe or pretrained, not word")
    if cfg.task == "causal_lm":
        if cfg.data is not None:
            raise UserError(f"{where}.data", "a causal_lm stage reads the plan's data (the tokenizer is trained on it)")
        assert lm is not None
        return lm, lm.fingerprint
    if plan.tokenizer.kind != "word" and not lm_based:
        raise UserError("tokenizer.kind", f"the built-in {cfg.task} models read words: set kind: word")
    train, val = _files(data_cfg, plan_dir, data_where)
    digest = hashlib.sha256(json.dumps([cfg.task, data_cfg.model_dump(mode="json"), plan.seed]).encode())
    for path in (train, val):
        if path is not None:
            digest.update(path.read_bytes())
    common: dict[str, Any] = {"val_path": val, "val_fraction": data_cfg.val_fraction, "seed": plan.seed}
    if data_cfg.max_len is not None:
        common["max_len"] = data_cfg.max_len
    vocab = plan.tokenizer.vocab_size or 10_000
    data: Any
    if cfg.task == "sft":
        assert lm is not None
        digest.update(lm.fingerprint.encode())
        data = prepare_sft(train, lm.tokenizer, eos_id(lm.tokenizer), data_cfg.max_len or 256,
                           pack=data_cfg.pack, **{k: v for k, v in common.items() if k != "max_len"})
    elif cfg.task == "classify":
        text, label = _field(data_cfg.field, "text"), _field(data_cfg.label, "label")
        if lm_based:
            assert lm is not None
            digest.update(lm.fingerprint.encode())
            data = prepare_classify(train, text, label, tokenizer=lm.tokenizer, pad_id=eos_id(lm.tokenizer), **common)
        else:
            data = prepare_classify(train, text, label, vocab_size=vocab, **common)
    elif cfg.task == "seq2seq":
        data = prepare_seq2seq(train, _field(data_cfg.source, "source"), _field(data_cfg.target, "target"),
                               vocab_size=vocab, **common)
    else:
        data = prepare_tag(train, vocab_size=vocab, **common)
    return data, digest.hexdigest()


def _field(value: Field | None, default: str) -> Field:
    return default if value is None else value


# The data keys each task reads (besides train, val, val_fraction, format).
_KEYS = {"causal_lm": {"field"}, "sft": {"max_len", "pack"}, "classify": {"field", "label", "max_len"},
         "seq2seq": {"source", "target", "max_len"}, "tag": {"max_len"}}


def _check_fields(tasks: set[str], cfg: DataConfig, where: str) -> None:
    """A data key that none of the tasks reading this data uses is a mistake."""
    used = set().union(*(_KEYS[t] for t in tasks))
    for key in sorted(cfg.model_fields_set & {"field", "label", "source", "target", "max_len", "pack"} - used):
        raise UserError(f"{where}.{key}", f"not used by task{'s' if len(tasks) > 1 else ''} "
                                          f"{', '.join(sorted(tasks))}")


def _files(cfg: DataConfig, plan_dir: Path, where: str) -> tuple[Path, Path | None]:
    """The task's one training file and optional validation file, relative to the plan."""
    paths = []
    for key in ("train", "val"):
        value = getattr(cfg, key)
        if value is None:
            paths.append(None)
            continue
        if not isinstance(value, str) or any(c in value for c in "*?[") or value.startswith("hub:"):
            raise UserError(f"{where}.{key}", "fine-tuning tasks read one local file (no list, glob or hub name)")
        path = (plan_dir / value).expanduser()
        if not path.is_file():
            raise UserError(f"{where}.{key}", f"no such file: {path}")
        paths.append(path)
    assert paths[0] is not None
    return paths[0], paths[1]


# --- models ----------------------------------------------------------------------------------------


def _root_model(cfg: ModelConfig, task: str, data: Any) -> nn.Module:
    """The plan's model for a first stage of a fine-tuning task (causal LMs: models.build)."""
    arch = cfg.arch
    if cfg.pretrained is not None or arch is None:
        raise UserError("model.pretrained", f"a first {task} stage builds its model from arch (pretrained "
                                            "loads causal LMs)")
    if arch in BUILTIN:
        if task not in BUILTIN[arch]:
            raise UserError("model.arch", f"'{arch}' is a model for {' and '.join(BUILTIN[arch])}, not {task}")
        return _builtin(BUILTIN[arch][task], arch, cfg.size_keys(), model_sizes(task, data))
    if task == "classify":
        return _transformers_classifier(arch, cfg.size_keys(), data)
    known = sorted(a for a, tasks in BUILTIN.items() if task in tasks)
    raise UserError("model.arch", f"task {task} trains the built-in {' or '.join(known)} (got '{arch}')")


def model_sizes(task: str, data: Any) -> dict[str, int]:
    if task == "classify":
        return {"num_classes": len(data.label_map), "vocab_size": data.tokenizer.get_vocab_size()}
    if task == "tag":
        return {"num_tags": len(data.tag_map), "vocab_size": data.vocab.get_vocab_size()}
    return {"src_vocab_size": data.src_tokenizer.get_vocab_size(), "tgt_vocab_size": data.tgt_tokenizer.get_vocab_size()}


def _builtin(cls: type[nn.Module], arch: str, keys: dict[str, Any], sizes: dict[str, int]) -> nn.Module:
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - _SET_BY_DATA
    for key in sorted(keys):
        if key not in allowed:
            raise UserError(f"model.{key}", f"not a setting of {arch} (it takes: {', '.join(sorted(allowed))})")
    try:
        return cls(**sizes, **keys)
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError("model", f"{arch} refused its settings: {e}") from None


def _transformers_classifier(arch: str, keys: dict[str, Any], data: ClassifyData) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if arch not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError("model.arch", f"'{arch}' is neither a built-in model nor a transformers architecture "
                                      "with a sequence-classification head")
    n = len(data.label_map)
    try:
        config = AutoConfig.for_model(arch, vocab_size=data.tokenizer.get_vocab_size(), num_labels=n,
                                      pad_token_id=0, **keys)
    except (TypeError, ValueError) as e:
        raise UserError("model", f"{arch} config refused: {e}") from None
    config.id2label = {i: label for i, label in enumerate(data.label_map.labels)}
    config.label2id = {label: i for i, label in config.id2label.items()}
    return AutoModelForSequenceClassification.from_config(config)

