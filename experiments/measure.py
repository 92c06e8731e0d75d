"""Timing of one callable, the device's measured ceilings that rooflines are drawn against, and one
profiled launch against a baseline.

On a GPU, cold-L2 launches replayed in a CUDA graph (the autotuner's timing, free of host launch
overhead): the median and the 20th-80th percentile spread. On the CPU (Triton's interpreter) the wall clock over a
few runs, so the pipeline runs end to end; those numbers time the interpreter, not a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from autotune.timing import cpu_time, do_bench_time, gpu_time
from kernels.family import Config, Family, torch_dtype


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
    """Median and spread of ``fn()``'s run time in ms, timed as the autotuner times (autotune/timing.py)."""
    if device == "cuda":
        med, p20, p80 = gpu_time(fn)
    else:
        fn()  # compile / warm up
        med, p20, p80 = cpu_time(fn, cpu_reps)
    return Timing(med, p80 - p20)


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
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        # Host-launched timing: these ops are long enough for launch cost not to matter, and a copy
        # captured into a CUDA graph becomes a copy-engine memcpy node, slower than the copy kernel
        # (seen on an H200: 2.7 against 4.2 TB/s).
        mm_ms, cp_ms = do_bench_time(lambda: torch.matmul(a, b))[0], do_bench_time(lambda: dst.copy_(src))[0]
    else:
        mm_ms, cp_ms = time_ms(lambda: torch.matmul(a, b), device).ms, time_ms(lambda: dst.copy_(src), device).ms
    return Ceilings(tflops=2 * n**3 / mm_ms / 1e9, gbps=2 * copy_bytes / cp_ms / 1e6)


def profiled_against(fam: Family, inputs: dict, config: Config, baseline: Callable[[], object], *,
                     warmup: int = 3) -> float:
    """One launch of ``config`` and one of ``baseline`` for a profiler started with
    ``--profile-from-start off`` (Nsight Compute): both run ``warmup`` times first (compile, warm
    up), then once each between cudaProfilerStart and cudaProfilerStop. Returns the config's max
    absolute error against the family's float64 reference, checked after the profiled range."""
    for _ in range(warmup):
        fam.run(inputs, config)
        baseline()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    out = fam.run(inputs, config)
    baseline()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return (out.double() - fam.reference(inputs)).abs().max().item()
