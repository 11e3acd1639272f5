"""Wall time of a call and the device's copy bandwidth.

* :func:`time_ms` -- median milliseconds of a call (CUDA events on GPU, the
  L2 cache flushed before each run; ``time.perf_counter`` on CPU).
* :func:`measure_copy_bandwidth` -- the device's ``copy_`` bandwidth, the
  yardstick for the "% of copy bandwidth" column.

Units: ``ms`` milliseconds, GB/s 1e9 bytes per second.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_l2_flush: dict = {}


def flush_l2(device) -> None:
    """Evict the GPU's L2 cache (zero a 256 MiB buffer); nothing on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    buf = _l2_flush.get(device)
    if buf is None:
        # larger than any current L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB)
        buf = _l2_flush[device] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    buf.zero_()


def _warmup(fn, device, runs: int, iters: int, max_seconds: float | None) -> int:
    """Run ``fn`` ``runs`` times; the number of timed runs to do: ``iters``, or
    fewer (at least 3) when they would take longer than ``max_seconds``,
    judged from the slowest warmup run."""
    slowest = 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if max_seconds is not None:
            synchronize(device)
            slowest = max(slowest, time.perf_counter() - t0)
    if max_seconds is not None and slowest > 0:
        iters = max(min(iters, 3), min(iters, int(max_seconds / slowest)))
    return iters


def _cuda_times(fn, device, iters: int, flush_cache: bool) -> list[float]:
    torch.cuda.synchronize(device)
    pairs = []
    for _ in range(iters):
        if flush_cache:
            flush_l2(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in pairs]


def _cpu_times(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_ms(fn: Callable[[], Any], device, warmup: int = 3, iters: int = 10, *,
            flush_cache: bool = True, return_all: bool = False, max_seconds: float | None = None):
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs.

    CUDA: one pair of CUDA events around each run, the L2 cache flushed before
    each (outside the events), one synchronize at the end.  CPU:
    ``time.perf_counter`` around each run.  ``max_seconds``: fewer runs (at
    least 3) when ``iters`` of them would take longer than that, judged from
    the slowest warmup run.
    """
    device = torch.device(device)
    iters = _warmup(fn, device, warmup, iters, max_seconds)
    times = _cuda_times(fn, device, iters, flush_cache) if device.type == "cuda" else _cpu_times(fn, iters)
    return times if return_all else statistics.median(times)


def measure_copy_bandwidth(device, nbytes: int | None = None, iters: int | None = None) -> float:
    """GB/s (1e9 B/s) of ``dst.copy_(src)``: bytes read + written over the median time.

    CUDA: 1 GiB buffers (less when memory is short); CPU: 64 MiB."""
    device = torch.device(device)
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(2**30, max(2**24, free // 4))
        else:
            nbytes = 64 * 2**20
    if iters is None:
        iters = 20 if device.type == "cuda" else 5
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=iters, flush_cache=False)
    return 2 * n * 4 / (ms * 1e-3) / 1e9
