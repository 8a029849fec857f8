"""Where, how and on how many threads to train: every `auto` of the plan's `device`, `precision`,
`compile` and `threads` is settled here (docs/explanation/auto.md).

- `device: auto`: CUDA when present, else CPU.
- `compile: auto`: torch.compile when the plan's causal-LM training is long enough to pay back the
  compilation (`COMPILE_PAYS_AFTER_S` of estimated eager training).
- `precision: auto`: bf16 autocast on CUDA with native bf16; on CPU, for wide enough models (below).
- `threads: auto`: the physical cores this process may use (OMP_NUM_THREADS when set), fewer when
  other processes keep cores busy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np
import torch

from stagewise.data.cores import omp_threads, physical_cores
from stagewise.engine.cpu_load import busy_cores
from stagewise.errors import UserError
from stagewise.plan.stage_settings import stage_ramp

if TYPE_CHECKING:
    from stagewise.config.plan_config import Plan


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError("device", f"'{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device", f"'{name}' asked for, but CUDA is not available here")
    return device


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


# --------------------------------------------------------------------------------- precision

# CPU bf16 autocast pays only for wide enough matmuls: every autocast op pays a cast of its
# activations (~ width per token) while only the matmuls gain (~ width^2 per token, on AMX /
# avx512_bf16). Measured on the 2-core CPU, bf16 against fp32 step time of a 4-layer GPT-2, eager,
# interleaved in one process (1 thread, other jobs running): width 128: 0.94-0.96x (and 0.56x on
# 2 idle threads: nanoGPT's baby GPT at 75 against 42 ms a step); 192: 1.22x; 256: 1.43-1.52x;
# a 6x384 GPT-2: 1.65x. Compiled, the gap widens where bf16 wins (4x256: 2.4x, 6x384: 2.6x over
# compiled fp32) and closes where it loses (baby GPT: 37.4 against 37.0 ms). So the choice is by
# width, compiled or not, which also keeps a stage's key (it holds the precision) independent of
# the plan's length, on which `compile: auto` depends.
CPU_BF16_MIN_WIDTH = 256


def model_width(model: torch.nn.Module) -> int:
    """The model's hidden width: its config's hidden_size (transformers), else its widest Linear."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(width, int):
        return width
    return max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)


def pick_precision(name: str, device_type: str, width: int, native: bool) -> str:
    """"fp32" or "bf16" for the plan's `precision` (auto | fp32 | bf16). auto: bf16 with native
    bf16 on CUDA, and on CPU for models at least CPU_BF16_MIN_WIDTH wide; else fp32."""
    if name != "auto":
        return name
    if not native:
        return "fp32"
    return "bf16" if device_type == "cuda" or width >= CPU_BF16_MIN_WIDTH else "fp32"


def resolve_precision(name: str, device: torch.device, model: torch.nn.Module) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Weights and optimizer state stay fp32."""
    native = name == "auto" and native_bf16(device)
    picked = pick_precision(name, device.type, model_width(model) if name == "auto" else 0, native)
    return torch.bfloat16 if picked == "bf16" else None


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], AbstractContextManager[None]]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------- compile

# torch.compile of a GPT-2 on the 2-core CPU costs ~40-100 s (a 4-layer model, train and eval
# graphs) and makes a step 12-50% shorter (fp32 least, bf16 most: inductor fuses the casts); it
# pays back once the eager training would have taken several minutes. Measured: nanoGPT's baby
# GPT (2000 steps, ~1.5 min eager) saves 5 of 42 ms a step, 10 s in all, for ~55 s of compiling:
# auto leaves it eager. A 4x256 GPT-2 at batch 16x128 in bf16 (compiled steps 2x faster) earns its
# compile back within a few hundred steps.
COMPILE_PAYS_AFTER_S = 300.0
# Eager training FLOP/s (6 N per token plus attention) to turn a plan into seconds: the 2-core CPU
# runs 60-90 GFLOP/s fp32 eager on these models. CUDA's figure is an assumption, not a
# measurement here: a modest GPU's eager rate on small models.
EAGER_FLOPS = {"cpu": 80e9, "cuda": 20e12}


def flops_per_token(params: int, n_layer: int | None, d_model: int | None, block: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward of every weight) plus attention's
    12 L d T (PaLM's appendix B, nanoGPT's estimate_mfu)."""
    attention = 12 * n_layer * d_model * block if n_layer and d_model else 0
    return 6.0 * params + attention


def model_shape(model: torch.nn.Module) -> tuple[int, int | None, int | None]:
    """(parameters, layers, width) of a transformers model; tied weights count once."""
    config = getattr(model, "config", None)
    n_layer = getattr(config, "num_hidden_layers", None)
    d_model = getattr(config, "hidden_size", None)
    return sum(p.numel() for p in model.parameters()), n_layer, d_model


def plan_lm_tokens(plan: Plan, train_tokens: int, context: int) -> list[tuple[int, int]]:
    """(tokens trained, block size) of each causal_lm stage: an estimate from its duration, made
    before the stages are resolved (compile must be settled before the model is set up)."""
    out = []
    for cfg in plan.stages:
        if cfg.task != "causal_lm":
            continue
        block = cfg.batch.block_size or context
        per_step = train_tokens if cfg.batch.full else cfg.batch.size * cfg.batch.accumulate * block
        if cfg.steps is not None and cfg.batch.ramp is not None:  # the batch grows over the stage
            tokens = stage_ramp(cfg, cfg.steps).sequences_before(cfg.steps) * block
        elif cfg.steps is not None:
            tokens = cfg.steps * per_step
        elif cfg.tokens is not None:
            tokens = cfg.tokens
        else:
            tokens = (cfg.epochs or 0) * train_tokens
        out.append((tokens, block))
    return out


def pick_compile(value: bool | str, device_type: str, flops: float) -> bool:
    """The plan's `compile` (true | false | auto); auto compiles when `flops` of causal-LM
    training would take COMPILE_PAYS_AFTER_S or longer eager on this device type."""
    if value != "auto":
        return bool(value)
    rate = EAGER_FLOPS.get(device_type)
    return rate is not None and flops / rate >= COMPILE_PAYS_AFTER_S


def resolve_compile(plan: Plan, device: torch.device, model: torch.nn.Module | None, train_tokens: int,
                    context: int) -> bool:
    """Whether the plan's causal LM is compiled (only its loss module compiles: tasks.lm)."""
    if model is None:
        return False
    params, n_layer, d_model = model_shape(model)
    flops = sum(tokens * flops_per_token(params, n_layer, d_model, block)
                for tokens, block in plan_lm_tokens(plan, train_tokens, context))
    return pick_compile(plan.compile, device.type, flops)


# ----------------------------------------------------------------------------------- threads

def pick_threads(value: int | str, omp_num_threads: str | None, cores: int, busy: float) -> int:
    """The plan's `threads` (N | auto). auto: OMP_NUM_THREADS when set to a positive integer,
    else `cores` less each core other processes keep at least half busy, and at least one.

    Why fewer when busy: torch's CPU ops split work over all their threads and wait for the
    slowest, so one thread descheduled by another process stalls every op. Measured on the 2-core
    machine with other jobs running: the same plan trained 7x slower on 2 threads than on 1
    (42 s against 6 s), and a 4x256 GPT-2 step took 4.8-5.3 s on 2 threads against 0.6-0.9 s
    on 1."""
    if value != "auto":
        return int(value)
    if (omp := omp_threads(omp_num_threads)) is not None:
        return omp
    return max(1, min(cores, cores - int(busy + 0.5)))


_PICKED: dict[str, int] = {}  # the first `threads: auto` of this process


def resolve_threads(value: int | str, previous: int | None = None) -> int:
    """`threads` for this run. auto is settled once per process, and a resumed run keeps the count
    it started with (`previous`): fp32 results depend on the thread count (reductions split
    differently), and a resumed run must end bit-identical to one never stopped."""
    if value != "auto":
        return int(value)
    if previous is not None:
        return previous
    if "auto" not in _PICKED:
        _PICKED["auto"] = pick_threads("auto", os.environ.get("OMP_NUM_THREADS"), physical_cores(), busy_cores())
    return _PICKED["auto"]


def settings_line(device: torch.device, dtype: torch.dtype | None, compiled: bool, threads: int,
                  plan: Plan) -> str:
    """One console line: what the run uses, and which of it `auto` chose."""
    def shown(key: str, text: str) -> str:
        return f"{text} (auto)" if getattr(plan, key) == "auto" else text

    precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
    return (f"settings: {shown('device', str(device))}, {shown('precision', precision)}, "
            f"{shown('compile', 'compiled' if compiled else 'eager')}, "
            f"{shown('threads', f'{threads} thread' + ('s' if threads != 1 else ''))}")


# ------------------------------------------------------------------------------------- seeds

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def derive_seed(seed: int, *names: str) -> int:
    """A stage's own seed: independent of how many random numbers earlier stages drew, so a
    stage trains the same whether its parent ran just now or was restored."""
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63
