"""Every RNG a training step can draw from, as plain data `torch.load(weights_only=True)` accepts."""

from __future__ import annotations

import io
import random
from typing import Any, cast

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())  # the legacy tuple form
    kind, keys, pos, has_gauss, cached = state
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_bytes() -> bytes:
    """This process's RNG state as bytes: how the ranks of a data-parallel run send theirs to rank 0."""
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    return buffer.getvalue()


def as_tensor(state: bytes) -> torch.Tensor:
    """Bytes as a checkpoint holds them (a uint8 tensor: weights_only loads it)."""
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def set_rng_tensor(state: torch.Tensor) -> None:
    set_rng_state(torch.load(io.BytesIO(state.numpy().tobytes()), weights_only=True))
