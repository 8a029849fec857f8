"""How well a stage uses its device: tokens per second per device, model FLOPs utilization (MFU)
against the device's bf16 peak, and peak memory; and the memory a plan's model is checked against.

MFU = training FLOPs per token (engine.device.flops_per_token: 6 N + 12 L d T) x tokens/s per
device / the device's peak, as PaLM (appendix B) and nanoGPT's estimate_mfu count it. A GPU's peak
is its dense bf16 tensor-core figure from the vendor's data sheet (BF16_PEAK_TFLOPS); a CPU's is
measured: the fastest of a few square GEMMs in the dtype the run computes in (the data sheets of
CPUs do not say what torch reaches on them).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from stagewise.plan.model_keys import host_memory

# Dense bf16 TFLOP/s (no sparsity, the vendor's data sheets) by the name torch.cuda.get_device_name
# reports; the first entry whose words all occur in it wins, so the variants come before the family
# (GH200 is an H200). A GPU not listed gets no MFU, not a guess.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
)
_CPU_PEAK: dict[tuple[str, int], float] = {}  # measured once per dtype and thread count


def gpu_peak_flops(name: str) -> float | None:
    """The bf16 peak of a GPU by its reported name; None for one not in the table."""
    for model, tflops in BF16_PEAK_TFLOPS:
        if all(word in name for word in model.split()):
            return tflops * 1e12
    return None


def cpu_peak_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """The fastest of `repeats` size x size GEMMs in `dtype` on this process's threads, FLOP/s
    (~30 ms on 2 idle cores); measured once per process."""
    key = (str(dtype), torch.get_num_threads())
    if key not in _CPU_PEAK:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # the first call allocates and picks its kernel
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        _CPU_PEAK[key] = 2 * size**3 / best
    return _CPU_PEAK[key]


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """What MFU is measured against: a GPU's bf16 peak, a CPU's measured GEMM peak in the run's dtype."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return cpu_peak_flops(dtype or torch.float32)
    return None


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, whose) of the memory a model trains in: a GPU's own, else this machine's."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"the GPU's ({props.name})"
    return host_memory()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float:
    """GB: on CUDA the most allocated since reset_peak_memory; on a CPU the process's peak
    resident set (it cannot be reset: the most of any stage so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class Utilization:
    per_second: float  # tokens (or examples) per device
    mfu: float | None  # a fraction of the peak; None where the peak or the FLOPs are unknown
    peak_memory_gb: float


def utilization(tokens: int, seconds: float, devices: int, flops_per_token: float | None, device: torch.device,
                dtype: torch.dtype | None) -> Utilization:
    """A stage's figures from the tokens all `devices` trained in `seconds`."""
    rate = tokens / max(seconds, 1e-9) / devices
    peak = peak_flops(device, dtype) if flops_per_token else None
    mfu = flops_per_token * rate / peak if peak and flops_per_token else None
    return Utilization(rate, mfu, peak_memory(device))
