"""Each stage's data and model, settled before anything trains.

A stage trains its parent's model, with two exceptions: the first stage (and every `from: init`
stage) trains the plan's `model` as built, and a `classify` stage whose parent trains a causal LM
(causal_lm or sft) puts a classification head on it: the LM's backbone weights carry over by name
(models.heads), the head starts fresh. Tasks that share a model: causal_lm and sft (a
transformers causal LM); classify (bigru, or a transformers sequence classifier such as bert);
seq2seq (the built-in `transformer`, or a transformers t5 / bart from config); tag (the built-in
`bigru` tagger).

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
from tokenizers import Tokenizer
from torch import nn

from stagewise.data.prepare import PreparedData
from stagewise.data.sources import data_file_keys
from stagewise.data.tokenizers import eos_id
from stagewise.errors import UserError
from stagewise.models.bigru import BiGRUClassifier, BiGRUTagger
from stagewise.models.heads import carry_weights, classifier_from_lm
from stagewise.models.seq2seq import TransformerSeq2Seq
from stagewise.plan.schema import DataConfig, ModelConfig, Plan, StageConfig
from stagewise.tasks.base import Task
from stagewise.tasks import classify, seq2seq, sft, tag
from stagewise.tasks.classify import ClassifyTask, prepare_classify
from stagewise.tasks.lm import LanguageModelTask
from stagewise.tasks.records import Field
from stagewise.tasks.seq2seq import PairData, Seq2SeqTask, prepare_seq2seq
from stagewise.tasks.sft import SftData, SftTask, prepare_sft
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.tag import TagTask, prepare_tag
from stagewise.tasks.vocab import PAD_ID

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
            with data_file_keys(data_cfg, plan_dir, f"{where}.data" if cfg.data is not None else "data"):
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


def make_task(setup: StageSetup, cfg: StageConfig, data_cfg: DataConfig, device: torch.device, autocast: Any,
              compile: bool) -> Task:
    """The stage's task; `data_cfg`: the data it reads (its own or the plan's)."""
    if setup.task == "causal_lm":
        return LanguageModelTask(setup.model, device, autocast, setup.data, compile)
    if setup.task == "sft":
        return SftTask(setup.model, device, autocast, setup.data, setup.model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
    if setup.task == "classify":
        return ClassifyTask(setup.model, device, autocast, setup.data)
    if setup.task == "seq2seq":
        return Seq2SeqTask(setup.model, device, autocast, setup.data, cfg.eval.beam,  # type: ignore[arg-type]
                           max_len(cfg.task, data_cfg))
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
    fmt = _table_format(cfg.task, data_cfg, data_where)
    common: dict[str, Any] = {"val_path": val, "val_fraction": data_cfg.val_fraction, "seed": plan.seed,
                              "max_len": max_len(cfg.task, data_cfg)}
    vocab = plan.tokenizer.vocab_size or 10_000
    data: Any
    if cfg.task == "sft":
        assert lm is not None
        digest.update(lm.fingerprint.encode())
        data = prepare_sft(train, lm.tokenizer, eos_id(lm.tokenizer), pack=data_cfg.pack, **common)
    elif cfg.task == "classify":
        text, label = column(data_cfg, "field"), column(data_cfg, "label")
        if lm_based:
            assert lm is not None
            digest.update(lm.fingerprint.encode())
            data = prepare_classify(train, text, label, tokenizer=lm.tokenizer, pad_id=eos_id(lm.tokenizer),
                                    fmt=fmt, **common)
        else:
            data = prepare_classify(train, text, label, vocab_size=vocab, fmt=fmt, **common)
    elif cfg.task == "seq2seq":
        # t5 and bart embed both sides with one table: one vocabulary of sources and targets
        data = prepare_seq2seq(train, column(data_cfg, "source"), column(data_cfg, "target"),
                               vocab_size=vocab, fmt=fmt, shared_vocab=plan.model.arch not in BUILTIN, **common)
    else:
        data = prepare_tag(train, vocab_size=vocab, **common)
    return data, digest.hexdigest()


def _table_format(task: str, cfg: DataConfig, where: str) -> str | None:
    """classify and seq2seq read csv, tsv or jsonl (auto: told by the extension); sft reads JSONL
    and tag CoNLL files, whatever their names."""
    tables = task in ("classify", "seq2seq")
    allowed = ("auto", "csv", "tsv", "json") if tables else ("auto", "json") if task == "sft" else ("auto",)
    if cfg.format not in allowed:
        raise UserError(f"{where}.format", f"a {task} stage reads {_READS[task]}: format "
                                           f"{' or '.join(allowed)} (got '{cfg.format}')")
    return {"auto": None, "json": "jsonl"}.get(cfg.format, cfg.format) if tables else None


_READS = {"classify": "csv, tsv or jsonl files", "seq2seq": "csv, tsv or jsonl files", "sft": "JSONL files",
          "tag": "CoNLL files"}


_COLUMNS = {"field": "text", "label": "label", "source": "source", "target": "target"}  # unset data keys
_MAX_LEN = {"sft": sft.MAX_LEN, "classify": classify.MAX_LEN, "seq2seq": seq2seq.MAX_LEN, "tag": tag.MAX_LEN}


def column(cfg: DataConfig, key: str) -> Field:
    """The column the data key `key` (field, label, source, target) names, or its default."""
    value = getattr(cfg, key)
    return _COLUMNS[key] if value is None else value


def max_len(task: str, cfg: DataConfig) -> int:
    """Tokens (tag: words) per example of an example-level task: the data's max_len or the task's
    default. seq2seq also decodes at most this many."""
    return cfg.max_len or _MAX_LEN[task]


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
        return _transformers_head(arch, cfg.size_keys(), task, data.tokenizer, data.label_map)
    if task == "tag":
        return _transformers_head(arch, cfg.size_keys(), task, data.vocab, data.tag_map)
    assert task == "seq2seq", task  # causal LMs are built by models.build
    return _transformers_seq2seq(arch, cfg.size_keys(), data)


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


SEQ2SEQ_ARCHS = ("t5", "bart")  # the transformers encoder-decoders tested with the seq2seq task


def _transformers_head(arch: str, keys: dict[str, Any], task: str, vocab: Tokenizer, labels: LabelMap) -> nn.Module:
    """A sequence classifier (classify) or token classifier (tag), e.g. bert, on the stage's word
    vocabulary (a tagger: one position per word), its labels named in the config."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.models.auto import modeling_auto

    if task == "classify":
        auto, names, head = (AutoModelForSequenceClassification,
                             modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "sequence")
    else:
        auto, names, head = (AutoModelForTokenClassification,
                             modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "token")
    if arch not in names:
        raise UserError("model.arch", f"'{arch}' is neither a built-in model nor a transformers architecture "
                                      f"with a {head}-classification head")
    id2label = dict(enumerate(labels.labels))
    return _from_config(auto, arch, keys, vocab_size=vocab.get_vocab_size(), num_labels=len(id2label),
                        pad_token_id=PAD_ID, id2label=id2label, label2id={v: i for i, v in id2label.items()})


def _transformers_seq2seq(arch: str, keys: dict[str, Any], data: PairData) -> nn.Module:
    """t5 or bart from config, on the stage's shared source/target vocabulary; decoding starts
    with its BOS and ends at its EOS (and nothing is forced: bart's default forces EOS at the
    length limit, which the built-in decoders do not)."""
    from transformers import AutoModelForSeq2SeqLM

    if arch not in SEQ2SEQ_ARCHS:
        raise UserError("model.arch", f"task seq2seq trains the built-in transformer or a transformers "
                                      f"{' or '.join(SEQ2SEQ_ARCHS)} from config (got '{arch}')")
    assert data.src_tokenizer is data.tgt_tokenizer, "transformers encoder-decoders share one vocabulary"
    return _from_config(AutoModelForSeq2SeqLM, arch, keys, vocab_size=data.tgt_tokenizer.get_vocab_size(),
                        pad_token_id=PAD_ID, bos_token_id=data.bos_id, eos_token_id=data.eos_id,
                        decoder_start_token_id=data.bos_id, forced_eos_token_id=None)


def _from_config(auto: Any, arch: str, keys: dict[str, Any], **set_by_data: Any) -> nn.Module:
    """A transformers model of `arch` built from config: the plan's size keys, plus what the
    data sets (vocabulary, labels, special tokens), which the plan may not override."""
    from transformers import AutoConfig

    for key in sorted(keys):
        if key in set_by_data:
            raise UserError(f"model.{key}", "set by the stage's data, not by the plan")
    try:
        config = AutoConfig.for_model(arch, **set_by_data, **keys)
    except (TypeError, ValueError) as e:
        raise UserError("model", f"{arch} config refused: {e}") from None
    return auto.from_config(config)
