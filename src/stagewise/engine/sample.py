"""The short generation a plan's `sample` asks for after training."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from stagewise.data.prepare import PreparedData
from stagewise.data.tokenizers import eos_id
from stagewise.engine.context import RunContext
from stagewise.models.build import context_length
from stagewise.models.generate import sample


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
