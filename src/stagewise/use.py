"""Using a trained run: export a stage, sample from it, evaluate it on a file. A stage's export
(`RUN/stages/NAME/`) is a directory `transformers` loads as it is, so these read only that and
the run's resolved plan."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from stagewise.errors import UserError
from stagewise.models.generate import sample


def stage_dir(run: Path, stage: str | None) -> Path:
    """The export of `stage` (default: the plan's last stage that has one)."""
    plan_file = run / "plan.yaml"
    if not plan_file.is_file():
        raise UserError(str(run), "not a run directory (no plan.yaml)")
    names = [s["name"] for s in yaml.safe_load(plan_file.read_text(encoding="utf-8"))["stages"]]
    done = [n for n in names if (run / "stages" / n / "config.json").is_file()]
    if stage is None:
        if not done:
            raise UserError(str(run), "no stage has finished yet")
        return run / "stages" / done[-1]
    if stage not in done:
        what = "has not finished" if stage in names else "is not a stage of this run"
        raise UserError("--stage", f"'{stage}' {what} (finished: {', '.join(done) or 'none'})")
    return run / "stages" / stage


def export(run: Path, stage: str, to: Path) -> Path:
    """Copy the stage's weights, config and tokenizer to `to` (which must not exist yet)."""
    source = stage_dir(run, stage)
    if to.exists():
        raise UserError("--to", f"{to} already exists (exporting never overwrites)")
    shutil.copytree(source, to, ignore=shutil.ignore_patterns("stagewise.json"))
    return to


def load(directory: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an export, as `transformers` loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of output is the point of these commands
    model = AutoModelForCausalLM.from_pretrained(directory)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def generate(directory: Path, prompt: str, max_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, seed: int) -> str:
    model, tok = load(directory)
    ids = tok.encode(prompt) if prompt else [tok.eos_token_id]
    context = model.config.max_position_embeddings
    out = sample(model, torch.tensor([ids]), max_tokens, context, temperature, top_k, top_p,
                 generator=torch.Generator().manual_seed(seed))
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


@torch.no_grad()
def evaluate(directory: Path, data: Path, batch_size: int = 16) -> dict[str, Any]:
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
