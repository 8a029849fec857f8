"""LoRA adapters on a transformers causal LM, through peft: the only module that imports it.

A stage with `adapter: {lora: ...}` trains a `PeftModel` whose base weights are frozen. Every
stage of one causal-LM chain shares the same weight tensors (the plan's model): an adapter stage's
model is a copy of the module tree that shares those tensors, with peft's LoRA layers injected, so
loading a parent's state into the plain model is loading it into every adapter model's base, and
an adapter costs its own parameters only. What happens at a stage's start (`AdapterStep.start`):

- a new adapter (`lora`, after a stage without one, or `from_parent: merge | new`) starts from
  peft's initialization (B = 0: the model is its parent's) drawn from the stage's seed;
- `from_parent: keep` trains the parent's adapter on (the same model: its optimizer state can carry);
- `from_parent: merge` first folds the parent's adapter into the shared weights (W += B A s);
- `from_parent: new` leaves the parent's adapter out: the parent's base weights, a new adapter;
- a stage without `adapter` after an adapter stage trains the merged weights (full fine-tuning).

An export holds the merged model (AutoModelForCausalLM loads it) and the adapter as peft saves it
(`adapter/`, PeftModel.from_pretrained on its base); checkpoints hold base and adapter weights, so
a resumed stage is exact.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.config.stage_config import AdapterConfig, LoraSettings
from stagewise.errors import UserError

ADAPTER = "default"  # peft's adapter name; each adapter stage's model holds one
ADAPTER_DIR = "adapter"  # inside an export: the adapter as PeftModel.from_pretrained reads it


@dataclass(frozen=True, eq=False)
class AdapterStep:
    """What a causal-LM stage does with adapters. `plain`: the model without adapters whose
    tensors the chain shares; `lora`: the adapter the stage trains (None: the model's own
    weights); `merge_parent`: fold the parent's adapter in first; `fresh`: the adapter is new;
    `base`: where the weights the adapter applies to are exported (a pretrained name, or
    `../STAGE` beside the stage's own export; None: the plan's model as built)."""

    plain: nn.Module
    lora: LoraSettings | None
    merge_parent: bool
    fresh: bool
    base: str | None

    def trainable(self, model: nn.Module) -> set[str] | None:
        """The parameters the stage trains: its adapter's (None: all of the model's)."""
        if self.lora is None:
            return None
        return {name for name, _ in model.named_parameters() if ".lora_" in name}

    def start(self, parent: nn.Module, model: nn.Module, seed: int) -> dict[str, Any]:
        """Prepare the stage's model once the parent's state is loaded; what was done, for the log."""
        done: dict[str, Any] = {}
        if self.merge_parent:
            done["merged_layers"] = merge_into_base(parent)
        if self.fresh:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for layer in _lora_layers(model):
                    layer.reset_lora_parameters(ADAPTER, init_lora_weights=True)
            done["new_adapter"] = {"r": self.lora.r, "alpha": self.lora.alpha}  # type: ignore[union-attr]
        if self.lora is not None:
            done["trainable"] = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        return done


def is_adapted(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def stage_model(parent_model: nn.Module, parent: AdapterStep | None, parent_name: str | None,
                pretrained: str | None, cfg: AdapterConfig | None, where: str) -> tuple[nn.Module, AdapterStep | None]:
    """The model a causal-LM stage trains, and its adapter step (None: the parent's model, as
    without adapters). `parent_name`: the parent stage (None: the plan's model, `pretrained`)."""
    parent_lora = parent.lora if parent is not None else None
    plain = parent.plain if parent is not None else parent_model
    base_of_parent = f"../{parent_name}" if parent_name is not None else pretrained
    if cfg is None:
        if parent_lora is None:
            return parent_model, None
        return plain, AdapterStep(plain, None, merge_parent=True, fresh=False, base=None)
    if parent_lora is not None and cfg.from_parent == "keep":
        if cfg.lora is not None and cfg.lora != parent_lora:
            raise UserError(f"{where}.adapter.lora", "from_parent: keep trains the parent's adapter on: leave lora "
                                                     "out or give the parent's (merge or new start another)")
        assert parent is not None
        return parent_model, AdapterStep(plain, parent_lora, merge_parent=False, fresh=False, base=parent.base)
    if parent_lora is None and "from_parent" in cfg.model_fields_set:
        raise UserError(f"{where}.adapter.from_parent", "the parent stage has no adapter to keep, merge or leave "
                                                        "out")
    if cfg.lora is None:
        raise UserError(f"{where}.adapter.lora", "required: the stage starts a new adapter")
    merge = parent_lora is not None and cfg.from_parent == "merge"
    if parent_lora is not None and not merge:  # new: on the parent's base weights
        assert parent is not None
        base = parent.base
    else:
        base = base_of_parent
    return attach(plain, cfg.lora, f"{where}.adapter.lora"), AdapterStep(plain, cfg.lora, merge, True, base)


def attach(plain: nn.Module, lora: LoraSettings, where: str) -> nn.Module:
    """A PeftModel with a LoRA adapter on a copy of `plain`'s module tree that shares its tensors.
    Built without drawing from the global RNG (the adapter is initialized when its stage starts)."""
    from peft import LoraConfig, get_peft_model
    from transformers import PreTrainedModel

    if not isinstance(plain, PreTrainedModel):
        raise UserError(where, "adapters go on transformers causal LMs")
    memo: dict[int, Any] = {id(t): t for t in (*plain.parameters(), *plain.buffers())}
    tree = copy.deepcopy(plain, memo)  # new modules, the same parameter and buffer tensors
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,  # type: ignore[arg-type]
                        target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")
    # peft asks transformers a deprecated question (is_gradient_checkpointing): not the user's to fix.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return get_peft_model(tree, config)
        except ValueError as e:
            key = "target_modules" if "target_modules" in str(e) or "Target modules" in str(e) else ""
            raise UserError(f"{where}.{key}" if key else where, str(e).splitlines()[0]) from None


def merge_into_base(model: nn.Module) -> int:
    """Add each LoRA layer's delta (B A scale) to the base weight it adapts, in place, leaving the
    adapter's own state as it is; returns the number of layers merged."""
    layers = _lora_layers(model)
    with torch.no_grad():
        for layer in layers:
            weight = layer.get_base_layer().weight
            weight += layer.get_delta_weight(ADAPTER).to(weight.dtype)
    return len(layers)


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def merged(model: nn.Module) -> nn.Module:
    """The model with its adapter merged in, as a plain transformers model (a copy: the stage's
    model keeps its adapter); a model without adapter as it is."""
    if not is_adapted(model):
        return model
    return copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]


def save_adapter(model: nn.Module, out: Path, base: str | None) -> None:
    """The adapter as peft saves it (adapter_config.json naming `base`, adapter_model.safetensors)."""
    model.peft_config[ADAPTER].base_model_name_or_path = base  # type: ignore[union-attr, index]
    model.save_pretrained(out)  # type: ignore[operator]
