"""What the standalone GPU suites (gemm_suite, attention_suite, fused_suite) share: picking the
candidates of a capped brute-force pass, compiling them ahead in a process pool, timing, the
run's copy bandwidth and the provenance columns of every row."""
from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import multiprocessing as mp
import random
from typing import Callable

import torch

import kernels
from autotune.timing import cpu_time, do_bench_time, gpu_time
from kernels.device import DeviceFacts, default_device
from kernels.family import Family

Job = tuple[str, dict, str, dict]  # (family name, shape, dtype, config)


def candidates(fam: Family, shape: dict, dtype: str, cap: int, seed: int) -> list[dict]:
    """The default config, then up to ``cap`` valid configs drawn evenly across structural variants."""
    rng = random.Random(seed)
    by_variant: dict[str, list[dict]] = {}
    for cfg in fam.configs(shape, dtype):
        by_variant.setdefault(str(cfg.get("variant", "")), []).append(cfg)
    for group in by_variant.values():
        rng.shuffle(group)
    picked = [fam.default_config(shape, dtype)]
    while len(picked) < cap + 1 and any(by_variant.values()):
        for group in by_variant.values():
            if group and len(picked) < cap + 1:
                cfg = group.pop()
                if cfg not in picked:
                    picked.append(cfg)
    return picked


def compile_one(job: Job) -> str | None:
    """Run one candidate once (fills Triton's disk cache for the timing process); its error or None."""
    name, shape, dtype, cfg = job
    try:
        fam = kernels.get_family(name)
        fam.run(fam.make_inputs(shape, dtype, default_device()), cfg)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return None
    except Exception as e:  # a candidate that fails to compile is reported, never fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__


def precompile(jobs: list[Job], workers: int) -> list[str | None]:
    """Compile the distinct jobs, in a spawn pool when ``workers`` > 1 (CUDA forbids fork); each job's error."""
    keys = [json.dumps(j, sort_keys=True) for j in jobs]
    unique = dict(zip(keys, jobs))
    if workers <= 1:
        errors = {k: compile_one(j) for k, j in unique.items()}
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            errors = dict(zip(unique, pool.map(compile_one, unique.values(), chunksize=2)))
    return [errors[k] for k in keys]


def bench(fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) ms: cold-L2 CUDA-graph replays on a GPU (the autotuner's
    timing, free of host launch overhead), wall clock on the CPU after one warm-up call."""
    if torch.cuda.is_available():
        return gpu_time(fn)
    fn()
    return cpu_time(fn, 3 if quick else 5)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy rate (bytes read + written), the memory roofline of this run; NaN on the CPU.

    Timed from the host: a copy captured in a CUDA graph runs on the copy engine, more slowly."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / do_bench_time(lambda: dst.copy_(src))[0] / 1e6


def provenance(facts: DeviceFacts) -> dict:
    """Provenance columns of every row: device, capability, versions, date."""
    return {
        "device": facts.name,
        "capability": ".".join(map(str, facts.capability)),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": dt.date.today().isoformat(),
    }


def run_meta(facts: DeviceFacts, copy_gbps: float) -> dict:
    """:func:`provenance` and the run's copy bandwidth."""
    return {**provenance(facts), "copy_GBps": copy_gbps}
