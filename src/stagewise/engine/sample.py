"""The short generation a plan's `sample` asks for after training."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from stagewise.data.prepared_data import PreparedData
from stagewise.data.tokenizers import eos_id
from stagewise.engine.context import RunContext
from stagewise.models.build import context_length
from stagewise.models.generate import sample
from stagewise.tasks.chat import ChatTemplate
from stagewise.tasks.lm import lm_stop


def generate_sample(run: RunContext, model: nn.Module, data: PreparedData, template: ChatTemplate | None) -> str:
    """The prompt and its continuation, ending at EOS, the chat template's end marker or a stop string."""
    cfg = run.plan.sample
    assert cfg is not None
    tok = data.tokenizer
    ids = tok.encode(cfg.prompt).ids if cfg.prompt else [eos_id(tok)]
    stop = lm_stop([eos_id(tok)], lambda text: tok.encode(text, add_special_tokens=False).ids,
                   lambda generated: tok.decode(generated, skip_special_tokens=True), template, tuple(cfg.stop))
    gen = torch.Generator(device=run.device).manual_seed(run.plan.seed)
    with run.autocast() if run.device.type == "cuda" else contextlib.nullcontext():  # batch 1: fp32 is faster on CPU
        out = sample(model, torch.tensor([ids], device=run.device), cfg.max_tokens,
                     context_length(model), cfg.temperature, cfg.top_k, generator=gen, stop=stop)
    generated, text = stop.cut(out[0, len(ids):].tolist())
    if text is None:
        return tok.decode([*ids, *generated], skip_special_tokens=True)
    return cfg.prompt + text
