"""How busy the machine is: the cores other processes keep busy (`threads: auto`, engine.device).

Torch-free, so that the CLI can open the window over which other processes' CPU use is measured
(`start_window`) as it starts, before torch is imported: by the time a plan is prepared (imports,
data, model: a second or more) it is long enough to average over without sleeping to measure it.
Without a window opened, `busy_cores` opens one and waits out its minimum length."""

from __future__ import annotations

import os
import time


def cpu_times() -> tuple[float, int, int] | None:
    """(wall time, jiffies the machine was busy, jiffies of this process), None without /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return time.monotonic(), user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])


_SINCE: tuple[float, int, int] | None = None
_MIN_WINDOW_S = 0.3


def start_window() -> None:
    """Start measuring other processes' CPU use now (`busy_cores` averages over the time since)."""
    global _SINCE
    _SINCE = cpu_times()


def busy_cores() -> float:
    """Cores other processes kept busy, on average, since `start_window` (/proc/stat minus this
    process's own time); the 1-minute load average where /proc is absent."""
    global _SINCE
    if _SINCE is None:
        start_window()
    start = _SINCE
    if start is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if time.monotonic() - start[0] < _MIN_WINDOW_S:
        time.sleep(_MIN_WINDOW_S - (time.monotonic() - start[0]))
    now = cpu_times()
    if now is None:
        return 0.0
    _SINCE = now
    return busy_between(start, now)


def busy_between(a: tuple[float, int, int], b: tuple[float, int, int]) -> float:
    """Cores other processes kept busy, on average, between two `cpu_times` samples."""
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / os.sysconf("SC_CLK_TCK") / max(b[0] - a[0], 1e-9))
