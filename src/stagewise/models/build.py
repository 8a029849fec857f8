"""Causal-LM models from `transformers`: built from a config (`arch` + its size keys, checked
against the architecture's config class) or loaded from a local directory / hub name."""

from __future__ import annotations

import builtins
import difflib
import inspect
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stagewise.config.plan_config import ModelConfig
from stagewise.errors import UserError, refused_object

if TYPE_CHECKING:  # transformers takes seconds to import: only the functions that build with it do
    from transformers import PretrainedConfig, PreTrainedModel


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int, plan_dir: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if cfg.pretrained is not None:
        return _load_pretrained(cfg.pretrained, vocab_size, plan_dir)
    config = model_config(cfg, vocab_size, eos_id)
    try:
        return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - keys past plan.model_keys' checks that the architecture refuses
        raise UserError("model", f"{cfg.arch} cannot be built from these keys: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:100] if str(e) else ''}") from None


def model_config(cfg: ModelConfig, vocab_size: int, eos_id: int) -> PretrainedConfig:
    """The architecture's config with the plan's size keys; unknown keys are refused by name."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = cfg.arch
    assert arch is not None
    if arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        match = difflib.get_close_matches(arch, list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise UserError("model.arch", f"'{arch}' is not a causal-LM architecture of transformers{hint}")
    config_class = CONFIG_MAPPING[arch]
    known = config_keys(config_class)
    keys = cfg.size_keys()
    for key in sorted(keys):
        if key not in known:
            match = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise UserError(f"model.{key}", f"not a config key of {arch}{hint}")
    if "vocab_size" in keys and keys["vocab_size"] < vocab_size:
        raise UserError("model.vocab_size", f"must be >= the tokenizer's {vocab_size} (got {keys['vocab_size']})")
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id}  # no pad: training windows are never padded
    try:
        return AutoConfig.for_model(arch, **{"vocab_size": vocab_size, **ids, **keys})
    except (ValueError, TypeError) as e:
        raise UserError("model", f"{arch} config refused: {e}") from None


def config_keys(config_class: type[PretrainedConfig]) -> set[str]:
    params = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return params | set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))


def _load_pretrained(name: str, vocab_size: int, plan_dir: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    local = (plan_dir / name).expanduser()
    source = str(local) if local.exists() else name
    try:  # weights_only: a pytorch_model.bin is read as tensors only, never unpickled freely
        model = AutoModelForCausalLM.from_pretrained(source, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError("model.pretrained", f"cannot load '{name}': its weights file holds an object that the safe "
                                            f"loader refuses{refused_object(e)}; it is never unpickled "
                                            "(safetensors weights hold none)") from None
    except (OSError, ValueError) as e:
        raise UserError("model.pretrained", f"cannot load '{name}': {str(e).splitlines()[0]}") from None
    embeddings: torch.nn.Embedding = model.get_input_embeddings()  # type: ignore[assignment]
    embedded = embeddings.num_embeddings
    if embedded < vocab_size:
        raise UserError("model.pretrained", f"'{name}' has {embedded} "
                                            f"token embeddings, fewer than the tokenizer's {vocab_size}")
    return model


def set_attention(model: torch.nn.Module, choice: str, compiled: bool, device: torch.device) -> str:
    """Pick the attention implementation (see ModelConfig.attention); returns the one in use.
    auto: SDPA on CUDA (its flash and memory-efficient kernels never hold the T x T scores)."""
    config: Any = model.config
    if choice == "auto":
        if device.type == "cuda":
            choice = "sdpa"
        else:
            choice = "eager" if compiled else config._attn_implementation
    if choice != config._attn_implementation:
        model.set_attn_implementation(choice)  # type: ignore[operator]
    return choice


def checkpoint_activations(model: torch.nn.Module, arch: str) -> None:
    """`model.activation_checkpointing`: each block (a transformer layer) recomputed in the backward
    pass, through the model's own `activation_checkpointing_enable` (transformers', models.gpt's)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", True):
        raise UserError("model.activation_checkpointing", f"{arch} does not support activation checkpointing")
    # non-reentrant: works with torch.compile, FSDP2 and inputs that need no gradient
    enable(activation_checkpointing_kwargs={"use_reentrant": False})


def apply_liger(model: torch.nn.Module, device: torch.device) -> None:
    """`model.liger`: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy) patched into a
    transformers model of a type Liger supports; on CUDA only, from the `stagewise[liger]` extra."""
    if device.type != "cuda":
        raise UserError("model.liger", f"Liger's kernels are Triton kernels for CUDA; this run is on {device.type}")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError("model.liger", "needs the liger-kernel package: pip install 'stagewise[liger]'") from None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError("model.liger", f"Liger has no kernels for {model_type} (it has: "
                                       f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})")
    _apply_liger_kernel_to_instance(model=model)


def context_length(model: torch.nn.Module) -> int:
    """The longest sequence the model takes (n_positions / max_position_embeddings)."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int):
        raise UserError("model", f"{getattr(config, 'model_type', type(model).__name__)} config has no "
                                 "max_position_embeddings")
    return length


class DropoutControl:
    """Sets dropout for one stage and restores the model's own rate for stages that set none.

    Covers `nn.Dropout` modules and the float `attention_dropout` that attention implementations
    pass to SDPA (e.g. Llama), so a stage's rate reaches every dropout the model has.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._modules: list[tuple[torch.nn.Module, str, float]] = []
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                self._modules.append((module, "p", module.p))
            elif isinstance(rate := getattr(module, "attention_dropout", None), float):
                self._modules.append((module, "attention_dropout", rate))

    def set(self, rate: float | None) -> None:
        for module, attr, own in self._modules:
            setattr(module, attr, own if rate is None else rate)

    def rates(self) -> builtins.set[float]:
        return {getattr(m, attr) for m, attr, _ in self._modules}
