"""Timing of one callable, and the device's measured ceilings that rooflines are drawn against.

On a GPU, ``triton.testing.do_bench`` (warm-up, L2 flushed before each run, CUDA events): the
median and the 20th-80th percentile spread. On the CPU (Triton's interpreter) the wall clock over a
few runs, so the pipeline runs end to end; those numbers time the interpreter, not a kernel.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.family import torch_dtype


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    spread_ms: float  # 80th minus 20th percentile


@dataclass(frozen=True)
class Ceilings:
    """What the device reached in this run: a big matmul's TFLOP/s and a copy's GB/s (read + write)."""

    tflops: float
    gbps: float


def time_ms(fn: Callable[[], object], device: str, *, cpu_reps: int = 3) -> Timing:
    """Median and spread of ``fn()``'s run time in ms (see the module docstring for how)."""
    if device == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p80 - p20))
    fn()  # compile / warm up
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return Timing(statistics.median(times), q[3] - q[0])


def measure_ceilings(device: str, dtype: str) -> Ceilings:
    """Matmul rate in ``dtype`` (float32 through TF32 on a GPU, like Triton's dots) and copy bandwidth.

    GPU: 8192^3 matmul, 1 GiB copy. CPU: 1024^3 float32 matmul, 64 MiB copy (the CPU's own
    ceilings; the interpreter runs far below them).
    """
    if device == "cuda":
        n, copy_bytes, dt = 8192, 1 << 30, torch_dtype(dtype)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        n, copy_bytes, dt = 1024, 64 << 20, torch.float32
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    mm = time_ms(lambda: torch.matmul(a, b), device)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cp = time_ms(lambda: dst.copy_(src), device)
    return Ceilings(tflops=2 * n**3 / mm.ms / 1e9, gbps=2 * copy_bytes / cp.ms / 1e6)
