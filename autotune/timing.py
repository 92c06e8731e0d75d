"""Timing of one launch: GPU time with a cold L2 and no host overhead, or wall clock on the CPU.

On a GPU, ``triton.testing.do_bench`` launches from Python in a loop: for kernels of a few tens of
microseconds the host's launch cost (Python, argument binding, descriptor creation) exceeds the
kernel's time and the measurement becomes the host's. The engine runs such kernels inside CUDA
graphs, so the tuner measures what the engine gets: ``inner`` launches, each preceded by an L2
flush (zeroing a buffer larger than L2), are captured into one CUDA graph; a second graph holds the
flushes alone. Each replay of both is timed with CUDA events, and the kernel's time is the
difference divided by ``inner``. Quantiles are taken over replays. A launch that cannot be captured
(it synchronises, say) falls back to ``do_bench``.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)


def _replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> np.ndarray:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return np.array([s.elapsed_time(e) for s, e in zip(starts, ends)])


def gpu_time(fn: Callable[[], Any], *, inner: int = 10, reps: int = 30) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) ms of one cold-L2 launch of ``fn`` (see module docstring)."""
    flush = torch.empty(int(torch.cuda.get_device_properties(0).L2_cache_size * 4) or 256 << 20,
                        dtype=torch.int8, device="cuda")
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    work, flushes = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(work):
            for _ in range(inner):
                flush.zero_()
                fn()
        with torch.cuda.graph(flushes):
            for _ in range(inner):
                flush.zero_()
        torch.cuda.synchronize()
    except Exception:  # not capturable: time from the host instead
        torch.cuda.synchronize()
        return do_bench_time(fn)
    work.replay()
    flushes.replay()
    total = _replay_ms(work, reps)
    base = np.median(_replay_ms(flushes, reps))
    per_launch = np.maximum(total - base, 1e-6) / inner
    med, p20, p80 = np.quantile(per_launch, QUANTILES)
    return float(med), float(p20), float(p80)


def do_bench_time(fn: Callable[[], Any], warmup_ms: float = 10.0, rep_ms: float = 40.0) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) ms by ``triton.testing.do_bench`` (launched from the host)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return float(med), float(p20), float(p80)


def cpu_time(fn: Callable[[], Any], runs: int = 3) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) wall-clock ms over ``runs`` calls (the interpreter)."""
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = np.quantile(times, QUANTILES)
    return float(med), float(p20), float(p80)
