"""Timing and peak-memory measurement for benchmarks.

CPU: wall clock around each call; peak memory, from one more untimed call, as
the kernel's resident-set high-water mark (reset through /proc/self/clear_refs
on Linux) minus the resident set before the call. CUDA: CUDA events and the
caching allocator's peak statistics.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    times_ms: list[float]
    peak_extra_bytes: int | None  # memory above what was allocated before the call


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Returns freed heap pages to the OS (glibc), so the resident set before a
    call holds only live memory and a call's new allocations show in the peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_extra(fn: Callable[[], object]) -> int | None:
    """Memory one call of ``fn`` adds at its peak: freed heap returned to the OS
    first, so that its allocations show in the resident set's high-water mark."""
    if not _reset_cpu_peak():
        return None
    base = _rss_bytes("VmRSS")
    result = fn()
    hwm = _rss_bytes("VmHWM")
    del result
    return (hwm - base) if (base is not None and hwm is not None) else None


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Runs ``fn`` ``warmup`` times, then ``repeats`` timed times; the result of
    ``fn`` is dropped before the next call. On a CPU the peak memory comes from
    one more, untimed call: measuring it returns the freed heap to the OS, and
    a timed call after that would pay page faults for memory that a process
    running the op in a loop keeps (a third of the encoder forward's time here)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[float] = []
    peak: int | None = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            extra = torch.cuda.max_memory_allocated(device) - base
            peak = extra if peak is None else max(peak, extra)
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        del result
    if device.type != "cuda":
        peak = _cpu_peak_extra(fn)
    return Timing(statistics.median(times), min(times), times, peak)
