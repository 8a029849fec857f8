"""Using a trained run: export a stage, run it on a prompt, evaluate it on a file.

A finished stage's export (`RUN/stages/NAME/`; `stagewise.json`, written last, marks it complete)
is either a transformers directory (causal LMs; classifiers on an LM backbone or bert) or a
built-in model (`model.safetensors` + `model.json` + word tokenizers: bigru, transformer). These
commands read only the export and the run's `plan.yaml`, for the stage's data settings (columns,
max_len, batch size, beam); a file is read and encoded by the task's own functions (tasks.*) as
the stage's files were, so evaluating the stage's validation file gives its own final metrics.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from tokenizers import Tokenizer
from torch import nn

from stagewise.data.tokenizers import eos_id
from stagewise.errors import UserError
from stagewise.models.generate import sample
from stagewise.plan.schema import DataConfig
from stagewise.tasks.classify import Encoded, evaluate_classify, logits_of
from stagewise.tasks.encode import encode_classification, encode_seq2seq, encode_sft, encode_tagging
from stagewise.tasks.export import BUILTIN_FILE
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.readers import read_conll, read_labeled, read_pairs, read_prompt_completion
from stagewise.tasks.seq2seq import PairData, PairRows, evaluate_seq2seq, translate
from stagewise.tasks.setup import BUILTIN, LM_TASKS, column, max_len
from stagewise.tasks.sft import SftRows, evaluate_sft
from stagewise.tasks.tag import TagData, TagRows, evaluate_tag
from stagewise.tasks.vocab import PAD_ID

MARKER = "stagewise.json"
CPU = torch.device("cpu")
COUNTS = ("tokens", "examples", "sentences")  # what `evaluate` counts, by task


@dataclass(frozen=True)
class Stage:
    """A finished stage: its export and what the run's plan says about its data."""

    directory: Path
    task: str
    labels: LabelMap | None  # classify: the classes; tag: the tags
    data: DataConfig  # the stage's own data, or the plan's
    batch_size: int  # what its validation was evaluated in
    beam: int  # seq2seq: the decoding of its validation BLEU / chrF

    @property
    def name(self) -> str:
        return self.directory.name


# --- finding a stage ---------------------------------------------------------------------------------


def _plan(run: Path) -> dict[str, Any]:
    plan_file = run / "plan.yaml"
    if not plan_file.is_file():
        raise UserError(str(run), "not a run directory (no plan.yaml)")
    return yaml.safe_load(plan_file.read_text(encoding="utf-8"))


def stage_dir(run: Path, stage: str | None) -> Path:
    """The export of `stage` (default: the plan's last stage that has one)."""
    names = [s["name"] for s in _plan(run)["stages"]]
    done = [n for n in names if (run / "stages" / n / MARKER).is_file()]
    if stage is None:
        if not done:
            raise UserError(str(run), "no stage has finished yet")
        return run / "stages" / done[-1]
    if stage not in done:
        what = "has not finished" if stage in names else "is not a stage of this run"
        raise UserError("--stage", f"'{stage}' {what} (finished: {', '.join(done) or 'none'})")
    return run / "stages" / stage


def open_stage(run: Path, stage: str | None) -> Stage:
    """The finished `stage` (default: the last), with its task and labels from its export's
    marker and its data settings from the run's plan."""
    directory = stage_dir(run, stage)
    plan = _plan(run)
    # Only the data part is validated (for its defaults): the rest of the plan is not needed, and
    # its data paths are relative to the original plan's directory, not the run's.
    config = next(s for s in plan["stages"] if s["name"] == directory.name)
    try:
        data = DataConfig.model_validate(config.get("data") or plan["data"])
    except ValidationError as e:
        raise UserError(str(run / "plan.yaml"), f"stage '{directory.name}': data: {e.errors()[0]['msg']}") from None
    marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    task = marker["task"]
    labels = None
    if marker.get("labels") is not None:
        kind = "tag" if task == "tag" else "label"
        labels = LabelMap.from_state_dict({"labels": marker["labels"], "kind": kind}, str(directory / MARKER))
    return Stage(directory, task, labels, data, config["batch"]["size"], config["eval"]["beam"])


def export(run: Path, stage: str, to: Path) -> Path:
    """Copy the stage's export to `to` (which must not exist yet), without stagewise's marker."""
    source = stage_dir(run, stage)
    if to.exists():
        raise UserError("--to", f"{to} already exists (exporting never overwrites)")
    shutil.copytree(source, to, ignore=shutil.ignore_patterns(MARKER))
    return to


# --- loading an export ---------------------------------------------------------------------------


def load(directory: Path, task: str = "causal_lm") -> tuple[Any, Any]:
    """(model, tokenizer) of a transformers export, as the Auto classes load them."""
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification, AutoTokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of output is the point of these commands
    auto = {"classify": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM,
            "tag": AutoModelForTokenClassification}.get(task, AutoModelForCausalLM)
    model = auto.from_pretrained(directory)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _tokenizer(path: Path) -> Tokenizer:
    """A saved `tokenizers` tokenizer: the tasks' encoders take these, not transformers' wrappers."""
    return Tokenizer.from_file(str(path))


def _builtin(stage: Stage) -> tuple[nn.Module, dict[str, Any]]:
    """A built-in model rebuilt as tasks.setup builds it (its constructor's sizes from the data and
    the plan's settings), with the stage's weights; and its model.json."""
    from safetensors.torch import load_model

    description = json.loads((stage.directory / BUILTIN_FILE).read_text(encoding="utf-8"))
    model = BUILTIN[description["arch"]][description["task"]](**description["sizes"], **description["settings"])
    load_model(model, str(stage.directory / "model.safetensors"))
    return model.eval(), description


def _classifier(stage: Stage) -> tuple[nn.Module, Tokenizer, int]:
    """The classifier, the tokenizer its texts were encoded with and the id that padded them."""
    if (stage.directory / "config.json").is_file():
        model, _ = load(stage.directory, "classify")
        return model, _tokenizer(stage.directory / "tokenizer.json"), model.config.pad_token_id
    model, _ = _builtin(stage)
    return model, _tokenizer(stage.directory / "tokenizer.json"), PAD_ID


def _translator(stage: Stage, beam: int) -> tuple[nn.Module, PairData]:
    """The model and its vocabularies, as the PairData tasks.seq2seq decodes with; its rows are
    empty (an export keeps no data): `evaluate` puts a file's in. `beam`: the search it is for,
    checked here so a bad --beam is one line, not beam_search's ValueError."""
    none = torch.zeros(0, 0, dtype=torch.long)
    empty = PairRows(none, none, none, ())
    model: nn.Module
    if (stage.directory / "config.json").is_file():  # t5, bart: one vocabulary for both sides
        model, _ = load(stage.directory, "seq2seq")
        vocab = _tokenizer(stage.directory / "tokenizer.json")
        data = PairData(vocab, vocab, model.config.decoder_start_token_id, model.config.eos_token_id, empty, empty)
        size = model.config.vocab_size
    else:
        model, description = _builtin(stage)
        data = PairData(_tokenizer(stage.directory / "source_tokenizer.json"),
                        _tokenizer(stage.directory / "target_tokenizer.json"),
                        description["bos_id"], description["eos_id"], empty, empty)
        size = model.out.out_features
    if beam > size:
        raise UserError("--beam", f"at most the target vocabulary's {size} tokens (got {beam})")
    return model, data


def _tagger(stage: Stage) -> tuple[nn.Module, Tokenizer]:
    """The tagger and its word vocabulary (one id per word: tasks.vocab.word_vocab)."""
    if (stage.directory / "config.json").is_file():
        model, _ = load(stage.directory, "tag")
    else:
        model, _ = _builtin(stage)
    return model, _tokenizer(stage.directory / "tokenizer.json")


def _check_beam(stage: Stage, given: bool) -> None:
    if given and stage.task != "seq2seq":
        raise UserError("--beam", f"only seq2seq stages decode with a beam ('{stage.name}' is {stage.task})")


# --- generate ------------------------------------------------------------------------------------


def generate(stage: Stage, prompt: str, *, max_tokens: int | None = None, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, beam: int = 1) -> str:
    """What the stage's model makes of `prompt`: a sampled continuation (causal_lm, sft), the
    predicted label and its probability (classify), a translation (seq2seq, greedy when beam is
    1) or word/TAG pairs (tag). `max_tokens` None: 200 (LMs), the data's max_len (seq2seq)."""
    _check_beam(stage, beam != 1)
    if stage.task in LM_TASKS:
        return _continue(stage.directory, prompt, max_tokens or 200, temperature, top_k, top_p, seed)
    if not prompt.strip():
        raise UserError("--prompt", f"a {stage.task} stage needs a text to work on")
    if stage.task == "classify":
        return _classify_text(stage, prompt)
    if stage.task == "seq2seq":
        return _translate_text(stage, prompt, max_tokens, beam)
    return _tag_text(stage, prompt)


def _continue(directory: Path, prompt: str, max_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None, seed: int) -> str:
    model, tok = load(directory)
    ids = tok.encode(prompt) if prompt else [tok.eos_token_id]
    context = model.config.max_position_embeddings
    out = sample(model, torch.tensor([ids]), max_tokens, context, temperature, top_k, top_p,
                 generator=torch.Generator().manual_seed(seed))
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


@torch.no_grad()
def _classify_text(stage: Stage, text: str) -> str:
    assert stage.labels is not None
    model, tok, _ = _classifier(stage)
    ids = torch.tensor([tok.encode(text).ids[: max_len(stage.task, stage.data)]])  # as encode_classification cuts
    probs = logits_of(model, ids, torch.ones_like(ids)).softmax(dim=-1)[0]
    best = int(probs.argmax())
    return f"{stage.labels.decode(best)} ({float(probs[best]):.3f})"


def _translate_text(stage: Stage, text: str, max_tokens: int | None, beam: int) -> str:
    model, data = _translator(stage, beam)
    length = max_len(stage.task, stage.data)
    # The source as encode_seq2seq encodes it: no BOS/EOS, its first max_len tokens.
    src = data.src_tokenizer.encode(text, add_special_tokens=False).ids[:length]
    return translate(model, data, torch.tensor([src]), max_tokens or length, beam)[0]


@torch.no_grad()
def _tag_text(stage: Stage, text: str) -> str:
    """Every whitespace-separated word of `text` with its tag (the tagger reads words as
    tasks.tag's CoNLL files give them: one id per word)."""
    assert stage.labels is not None
    model, vocab = _tagger(stage)
    words = text.split()
    ids = torch.tensor([vocab.encode(words, is_pretokenized=True, add_special_tokens=False).ids])
    tags = logits_of(model, ids, torch.ones_like(ids)).argmax(dim=-1)[0].tolist()
    return " ".join(f"{word}/{stage.labels.decode(tag)}" for word, tag in zip(words, tags, strict=True))


# --- evaluate ------------------------------------------------------------------------------------


def evaluate(stage: Stage, data: Path, fmt: str | None = None, beam: int | None = None) -> dict[str, Any]:
    """The task's metrics on `data`, a file like the stage's own (its columns as the plan names
    them), named as in the run's logs without `val_` (loss, accuracy, bleu, ...), and how many
    tokens / examples / sentences were scored. `fmt`: csv, tsv or jsonl for classify and seq2seq
    files (default: told by the extension, as training tells it); `beam`: seq2seq's decoding
    (default: the stage's eval.beam)."""
    if fmt is not None and stage.task not in ("classify", "seq2seq"):
        raise UserError("--format", f"only for classify and seq2seq files ({stage.task} files have one format)")
    _check_beam(stage, beam is not None)
    if stage.task == "causal_lm":
        return _evaluate_lm(stage.directory, data)
    if stage.task == "sft":
        metrics, count = _evaluate_sft(stage, data)
    elif stage.task == "classify":
        metrics, count = _evaluate_classify(stage, data, fmt)
    elif stage.task == "seq2seq":
        metrics, count = _evaluate_seq2seq(stage, data, fmt, beam or stage.beam)
    else:
        metrics, count = _evaluate_tag(stage, data)
    names = {"val_ppl": "perplexity"}  # as causal_lm's evaluation names it
    unit = "sentences" if stage.task == "tag" else "examples"
    return {**{names.get(k, k.removeprefix("val_")): v for k, v in metrics.items()}, unit: count}


def _evaluate_sft(stage: Stage, data: Path) -> tuple[dict[str, float], int]:
    tok = _tokenizer(stage.directory / "tokenizer.json")
    # Validation rows are never packed (tasks.sft): each example's loss on its own.
    rows = SftRows(*encode_sft(read_prompt_completion(data), tok, eos_id(tok), max_len(stage.task, stage.data),
                               pack=False))
    model, _ = load(stage.directory)
    return evaluate_sft(model, rows, stage.batch_size, CPU), len(rows)


def _evaluate_classify(stage: Stage, data: Path, fmt: str | None) -> tuple[dict[str, float], int]:
    assert stage.labels is not None
    records = read_labeled(data, column(stage.data, "field"), column(stage.data, "label"), fmt)
    model, tok, pad_id = _classifier(stage)
    rows = Encoded(*encode_classification(records, tok, stage.labels, max_len(stage.task, stage.data), pad_id))
    return evaluate_classify(model, rows, stage.batch_size, CPU), len(rows)


def _evaluate_seq2seq(stage: Stage, data: Path, fmt: str | None, beam: int) -> tuple[dict[str, float], int]:
    records = read_pairs(data, column(stage.data, "source"), column(stage.data, "target"), fmt)
    model, pairs = _translator(stage, beam)
    length = max_len(stage.task, stage.data)
    rows = PairRows(*encode_seq2seq(records, pairs.src_tokenizer, pairs.tgt_tokenizer, length, PAD_ID,
                                    pairs.bos_id, pairs.eos_id), tuple(t for _, t in records))
    return evaluate_seq2seq(model, replace(pairs, val=rows), stage.batch_size, CPU, length, beam), len(rows)


def _evaluate_tag(stage: Stage, data: Path) -> tuple[dict[str, float], int]:
    assert stage.labels is not None
    records = read_conll(data)
    model, vocab = _tagger(stage)
    rows = TagRows(*encode_tagging(records, vocab, stage.labels, max_len(stage.task, stage.data), PAD_ID))
    # evaluate_tag scores data.val only; the rows stand in for the training rows an export lacks.
    return evaluate_tag(model, TagData(vocab, stage.labels, rows, rows), stage.batch_size, CPU), len(rows)


@torch.no_grad()
def _evaluate_lm(directory: Path, data: Path, batch_size: int = 16) -> dict[str, Any]:
    """Token-weighted next-token loss and perplexity of the model on a text file, in windows of
    its context length (the tail that fills no window is left out, as in training)."""
    if not data.is_file():
        raise UserError(str(data), "no such file")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(str(data), f"not UTF-8: byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
    model, tok = load(directory)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    block = model.config.max_position_embeddings
    windows = (len(ids) - 1) // block
    if windows < 1:
        raise UserError(str(data), f"{len(ids)} tokens: too few for one window of {block + 1}")
    rows = ids[: windows * block + 1]
    x = rows[:-1].view(windows, block)  # (N, T)
    y = rows[1:].view(windows, block)
    total = 0.0
    for start in range(0, windows, batch_size):
        logits = model(input_ids=x[start:start + batch_size], use_cache=False).logits.float()  # (B, T, V)
        total += torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), y[start:start + batch_size].reshape(-1), reduction="sum").item()
    loss = total / y.numel()
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 50 else None, "tokens": y.numel()}
