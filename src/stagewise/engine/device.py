"""Where and in what precision to train: `device: auto` is CUDA when present, else CPU;
`precision: auto` is bf16 autocast where the hardware runs bf16 natively, else fp32."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from stagewise.errors import UserError


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


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Weights and optimizer state stay fp32."""
    if name == "fp32":
        return None
    if name == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], AbstractContextManager[None]]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def derive_seed(seed: int, *names: str) -> int:
    """A stage's own seed: independent of how many random numbers earlier stages drew, so a
    stage trains the same whether its parent ran just now or was restored."""
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63
