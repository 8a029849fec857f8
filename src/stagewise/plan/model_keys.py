"""The plan's model keys, checked before any data is read or any model is built (`check` and
`train` alike), so that a plan from anyone fails as one line naming the key instead of inside
transformers or torch: each key typed against the architecture's own defaults (a transformers
config class, or a built-in model's constructor), sizes positive and bounded, hidden sizes
divisible by head counts, and the model's size estimated against the memory of the device it
trains on (a GPU's own on CUDA, else this machine's)."""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Callable
from typing import Any

from pydantic_core import PydanticUndefined

from stagewise.config.plan_config import Plan
from stagewise.config.registry import ARCHS, arch_model
from stagewise.errors import UserError
from stagewise.models.build import config_keys
from stagewise.plan.load import echo
from stagewise.tasks.models import check_settings, unknown_settings
from stagewise.tasks.spec import task_spec

MAX_SIZE = 2**24  # any width, length or count
MAX_LAYERS = 256  # a thousand blocks take minutes to build on a CPU
BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and Adam's two moments
# (hidden size, head count) pairs the attention splits; config attribute names of transformers.
_DIVIDES = (("hidden_size", "num_attention_heads"), ("hidden_size", "num_key_value_heads"),
            ("num_attention_heads", "num_key_value_heads"), ("d_model", "decoder_attention_heads"),
            ("d_model", "nhead"))
_ACTIVATION_KEYS = ("activation_function", "hidden_act")


def check_model_keys(plan: Plan, memory: tuple[int, str] | None = None) -> None:
    """UserError naming `model.<key>` for the first key that cannot be right; also when the model
    is far beyond `memory`: (bytes, whose) of the device it trains on (engine.device.device_memory;
    None: this machine's)."""
    memory = memory or host_memory()
    cfg = plan.model
    if cfg.arch is None:  # pretrained: what it loads is checked as it loads
        return
    keys = cfg.size_keys()
    vocab = keys.get("vocab_size") or plan.tokenizer.vocab_size or 256
    if cfg.arch in ARCHS:  # a model stagewise builds
        model = arch_model(cfg.arch, task_spec(plan.stages[0].task).traits.model_kind)  # the first stage's task builds it
        if model is None:  # not a model of that task: said by the task when it builds
            return
        unknown_settings(cfg.arch, model, keys)
        defaults = {n: f.default for n, f in model.settings.model_fields.items() if f.default is not PydanticUndefined}
        _check_types(keys, defaults, cfg.arch)
        check_settings(cfg.arch, model, keys)
        _check_divisible({**defaults, **keys}, {}, cfg.arch)
        _check_memory(_builtin_parameters(model.build, {**defaults, **keys}, vocab), memory)
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if cfg.arch not in CONFIG_MAPPING:  # an unknown arch: said when the model is built
        return
    config_class = CONFIG_MAPPING[cfg.arch]
    known = config_keys(config_class)
    for key in sorted(keys):
        if key not in known:
            match = difflib.get_close_matches(key[:100], sorted(known), n=1)
            raise UserError(f"model.{key}", f"not a config key of {cfg.arch}"
                                            + (f" (did you mean '{match[0]}'?)" if match else ""))
    _check_types(keys, config_class().to_dict(), cfg.arch)
    try:  # token ids within the probe's vocabulary, as the real build sets them
        config = config_class(**{"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, **keys})
    except Exception as e:  # noqa: BLE001 - a config class may refuse a combination in its own way
        raise UserError("model", f"{cfg.arch} config refused: {type(e).__name__}: {str(e)[:100]}") from None
    names = getattr(config_class, "attribute_map", {})  # config attribute -> the plan's key
    values = {a: getattr(config, a, None) for pair in _DIVIDES for a in pair}
    if "head_dim" in names or {"head_dim", "d_kv"} & set(keys):  # heads of their own width (t5's d_kv)
        values["hidden_size"] = None
    _check_divisible(values, names, cfg.arch)
    _check_memory(_transformers_parameters(config), memory)


def _check_types(keys: dict[str, Any], defaults: dict[str, Any], arch: str) -> None:
    """Each key's value has the type of its default: an int size is a positive int (a count whose
    default is 0 may be 0), a float is finite (a rate in [0, 1]), a bool is a bool, a string is
    short; a key without a typed default takes a scalar."""
    for key, value in keys.items():
        where, default = f"model.{key}", defaults.get(key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(where, f"must be true or false (got {_short(value)})")
        elif isinstance(default, int):
            _check_int(where, key, value, floor=min(default, 1))
        elif isinstance(default, float):
            _check_float(where, key, value)
        elif isinstance(default, str):
            if not isinstance(value, str) or len(value) > 256:
                raise UserError(where, f"must be a short string (got {_short(value)})")
            if key in _ACTIVATION_KEYS:
                from transformers.activations import ACT2FN

                if value not in ACT2FN:
                    raise UserError(where, f"{_short(value, 40)} is not an activation of transformers")
        elif isinstance(default, (list, dict)):
            if not isinstance(value, type(default)) or len(value) > 256:
                raise UserError(where, f"must be a {type(default).__name__} of at most 256 items (got {_short(value)})")
        elif isinstance(value, int) and not isinstance(value, bool):
            _check_int(where, key, value, floor=0)
        elif isinstance(value, float):
            _check_float(where, key, value)
        elif not (value is None or isinstance(value, bool) or isinstance(value, str) and len(value) <= 256):
            raise UserError(where, f"must be a number, true/false or a short string (got {_short(value)})")


def _check_int(where: str, key: str, value: Any, floor: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(where, f"must be an integer (got {_short(value)})")
    top = MAX_LAYERS if "layers" in key or key == "n_layer" else MAX_SIZE
    if not floor <= value <= top:
        raise UserError(where, f"must be in {floor}..{top:,} (got {_short(value)})")


def _check_float(where: str, key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(where, f"must be a finite number (got {_short(value)})")
    if any(w in key for w in ("dropout", "pdrop", "prob")) and not 0.0 <= value <= 1.0:
        raise UserError(where, f"a rate: must be in [0, 1] (got {value})")
    if ("eps" in key or "epsilon" in key) and value <= 0:
        raise UserError(where, f"must be > 0 (got {value})")


def _check_divisible(values: dict[str, Any], plan_names: dict[str, str], arch: str) -> None:
    for size, heads in _DIVIDES:
        a, b = values.get(size), values.get(heads)
        if isinstance(a, int) and isinstance(b, int) and b > 0 and a % b:
            size_key, heads_key = plan_names.get(size, size), plan_names.get(heads, heads)
            raise UserError(f"model.{size_key}", f"{arch} splits it over model.{heads_key}: must be divisible "
                                                 f"by it (got {a} and {b})")


def _transformers_parameters(config: Any) -> int:
    """About how many parameters: blocks of attention (4 d^2) and MLP (2 d ff), embeddings."""
    d = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(d, int) or not isinstance(layers, int):
        return 0
    if getattr(config, "is_encoder_decoder", False):
        layers += next((v for a in ("num_decoder_layers", "decoder_layers")
                        if isinstance(v := getattr(config, a, None), int)), layers)
    ff = next((v for a in ("intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim")
               if isinstance(v := getattr(config, a, None), int)), 4 * d)
    vocab = getattr(config, "vocab_size", 0) or 0
    positions = getattr(config, "max_position_embeddings", 0) or 0
    heads = 1 if getattr(config, "tie_word_embeddings", True) else 2
    return layers * (4 * d * d + 2 * d * ff) + (heads * vocab + positions) * d


def _builtin_parameters(cls: Callable[..., Any], settings: dict[str, Any], vocab: int) -> int:
    """Exact, without allocating: built on the meta device with each layer count at 1 and 2
    (parameters grow linearly in it), so a deep setting costs no time either."""
    import torch

    exact = getattr(cls, "parameter_count", None)
    if exact is not None:
        return int(exact(vocab_size=vocab, **settings))
    required = {n: (vocab if "vocab" in n else 2) for n, p in inspect.signature(cls).parameters.items()
                if p.default is inspect.Parameter.empty}
    layer_keys = [k for k, v in settings.items() if ("layers" in k or k == "n_layer") and isinstance(v, int)]

    def count(**layers: int) -> int:
        with torch.device("meta"):
            model = cls(**required, **{**settings, **layers})
        return sum(p.numel() for p in model.parameters())

    try:
        base = count(**{k: 1 for k in layer_keys})
        grow = {k: count(**{j: 2 if j == k else 1 for j in layer_keys}) - base for k in layer_keys}
    except Exception:  # noqa: BLE001 - settings the model refuses: said when it is built
        return 0
    return base + sum((settings[k] - 1) * grow[k] for k in layer_keys)


def host_memory() -> tuple[int, str] | None:
    """(bytes, whose) of this machine's memory; None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(parameters: int, memory: tuple[int, str] | None) -> None:
    if memory is None:  # nothing known to compare with
        return
    need = parameters * BYTES_PER_PARAMETER
    if need > memory[0]:
        raise UserError("model", f"about {parameters:.3g} parameters need {need / 1e9:,.1f} GB to train (weights, "
                                 f"gradients, Adam's moments), beyond {memory[1]} {memory[0] / 1e9:.1f} GB")


def _short(value: Any, limit: int = 60) -> str:
    return echo(value, limit)
