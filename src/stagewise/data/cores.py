"""The CPU cores this process may use: what `threads: auto` (engine.device) and `data.num_proc:
auto` (data.encoding) start from."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthreads of one core count once:
    a second thread per core adds little to matmuls and contends for the same units)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        processor = ""
        physical = ""
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                processor, physical = value, ""
            elif key == "physical id":
                physical = value
            elif key == "core id" and processor.isdigit() and int(processor) in allowed:
                cores.add((physical, value))
    except OSError:
        pass
    return len(cores) or len(allowed) or 1


def omp_threads(value: str | None) -> int | None:
    """OMP_NUM_THREADS (`value`) when it is set to a positive integer: the user's cap on the cores used."""
    return int(value) if value is not None and value.strip().isdigit() and int(value) >= 1 else None
