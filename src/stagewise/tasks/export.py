"""A stage's final model as a directory (`RUN/stages/NAME/`) that can be used without stagewise's
plan: transformers models through `save_pretrained` (AutoModel* and AutoTokenizer load it as it
is; a classifier's config names its labels); the built-in models (bigru, transformer) as
`model.safetensors` + `model.json` (arch, settings, sizes, labels) + their word tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from stagewise.data.tokenizers import to_transformers
from stagewise.plan.schema import ModelConfig
from stagewise.tasks.seq2seq import BOS, EOS
from stagewise.tasks.setup import StageSetup, model_sizes
from stagewise.tasks.vocab import PAD, UNK

BUILTIN_FILE = "model.json"


def labels_of(setup: StageSetup) -> list[str] | None:
    for attr in ("label_map", "tag_map"):
        if hasattr(setup.data, attr):
            return list(getattr(setup.data, attr).labels)
    return None


def save_stage(setup: StageSetup, lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    labels = labels_of(setup)
    model = setup.model
    if isinstance(model, PreTrainedModel):
        if labels is not None:
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(out)
        if setup.lm_based:
            assert lm_tokenizer is not None
            to_transformers(lm_tokenizer).save_pretrained(out)
        elif setup.task == "seq2seq":  # t5, bart: one vocabulary for both sides
            _word_tokenizer(setup.data.tgt_tokenizer, bos_token=BOS, eos_token=EOS).save_pretrained(out)
        else:  # a classifier or tagger from config (bert): its word vocabulary
            _word_tokenizer(setup.data.tokenizer if setup.task == "classify" else setup.data.vocab).save_pretrained(out)
        return
    save_model(model, str(out / "model.safetensors"))
    description: dict[str, Any] = {"task": setup.task, "arch": model_cfg.arch, "settings": model_cfg.size_keys(),
                                   "sizes": model_sizes(setup.task, setup.data), "labels": labels}
    if setup.task == "seq2seq":
        setup.data.src_tokenizer.save(str(out / "source_tokenizer.json"))
        setup.data.tgt_tokenizer.save(str(out / "target_tokenizer.json"))
        description.update(bos_id=setup.data.bos_id, eos_id=setup.data.eos_id)
    else:
        (setup.data.tokenizer if setup.task == "classify" else setup.data.vocab).save(str(out / "tokenizer.json"))
    (out / BUILTIN_FILE).write_text(json.dumps(description, indent=1))


def _word_tokenizer(tok: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    """A word vocabulary (tasks.vocab) as AutoTokenizer loads it: padding, unknown words and the
    given special tokens declared."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, **special)
