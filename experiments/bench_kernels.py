"""Kernel benchmark: tuned and default configs of one family against the vendor baselines.

    python -m experiments.bench_kernels                                   # gemm, CPU tiny / GPU Llama shapes
    python -m experiments.bench_kernels -m kernel=gemm,attention_prefill shapes=llama-3.1-8b

For each shape of the shape set: inputs made once, the float32/float64 reference computed, then
each implementation checked (output poisoned with NaN, relative error under the family's tolerance:
a wrong result is recorded and never timed) and timed (``experiments.measure.time_ms``):
- ``tuned``: the config tuned dispatch (``autotune.tuned``, what the engine calls) launches: the
  cached winner of this shape, else of the nearest cached shape when ``nearest`` and it fits, else
  the default (column ``config_source`` says which);
- ``default``: the family's heuristic config;
- baselines: ``cublas`` (``torch.matmul``), ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient``
  (``scaled_dot_product_attention`` held to that backend), or ``torch`` (the family's PyTorch op as
  is; the CPU's baseline).
Writes results.csv (a row per measurement, speedup over the fastest baseline) and the throughput
and roofline figures into the run folder, and logs them to W&B.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

import autotune
from experiments.context import Run, family, fail, pick, start
from experiments.measure import Ceilings, measure_ceilings, time_ms
from experiments.shapes import shape_set
from experiments.table import add_speedups, kernel_row
from kernels.family import Family, rel_error

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
GPU_ONLY = {"cublas", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"}
BASELINES = {"torch", "cublas", *SDPA_BACKENDS}
IMPLS = ("tuned", "default")


def resolve_baselines(setting: Any, kernel_baselines: list[str], device: str) -> list[str]:
    """The baselines to time: ``auto`` is the kernel's list on a GPU and ``torch`` on the CPU."""
    if setting == "auto":
        return list(kernel_baselines) if device == "cuda" else ["torch"]
    names = [setting] if isinstance(setting, str) else list(setting)
    unknown = sorted(set(names) - BASELINES)
    if unknown:
        fail(f"baselines {unknown} unknown; choose from {sorted(BASELINES)} or auto")
    gpu_only = sorted(set(names) & GPU_ONLY)
    if gpu_only and device != "cuda":
        fail(f"baselines {gpu_only} need a CUDA GPU; on the CPU use baselines=[torch] (or auto)")
    return names


def baseline_backend(name: str) -> contextlib.AbstractContextManager:
    """The SDPA backend restriction a baseline runs under (nothing for cublas and torch)."""
    if name not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def _poison(inputs: dict) -> None:
    outs = inputs["out"] if isinstance(inputs["out"], (list, tuple)) else [inputs["out"]]
    for t in outs:
        t.fill_(math.nan)


def _error(out: Any, ref: Any) -> float:
    """Largest relative error over the outputs (a tensor or a tuple of tensors)."""
    if isinstance(out, (list, tuple)):
        return max(rel_error(o, r) for o, r in zip(out, ref))
    return rel_error(out, ref)


def tuned_config(fam: Family, shape: dict, dtype: str, cfg: DictConfig) -> tuple[dict, str]:
    """(config, source) that tuned dispatch (what the engine calls) launches for ``shape``.

    source: 'exact' or 'nearest' cache match, or 'default' when nothing cached fits this shape.
    """
    dispatch = autotune.tuned(fam.name, cache_path=cfg.cache_path, nearest=cfg.nearest)
    config, source = dispatch.config_for(shape, dtype)
    return (config if config is not None else fam.default_config(shape, dtype)), source


def measure(run: Run, inputs: dict, ref: Any, check: Callable[[], Any], timed: Callable[[], Any], tol: float,
            backend: contextlib.AbstractContextManager) -> tuple[float, float, float, str]:
    """(ms, spread, rel_error, state): ``check()``'s output against ``ref`` first; ``timed()`` is
    timed only when it was right (for in-place families it skips ``check``'s copy-in)."""
    try:
        with backend:
            _poison(inputs)
            out = check()
            if out is None:
                return math.nan, math.nan, math.nan, "no baseline for this shape"
            err = _error(out, ref)
            if not err <= tol:
                return math.nan, math.nan, err, f"wrong result: rel error {err:.3g} > {tol:.1g}"
            t = time_ms(timed, run.device)
    except Exception as e:  # a baseline backend that cannot run this shape, a kernel that fails
        return math.nan, math.nan, math.nan, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return t.ms, t.spread_ms, err, "ok"


def bench_shape(run: Run, fam: Family, shape: dict, cfg: DictConfig, baselines: list[str], ceilings: Ceilings,
                bar: tqdm) -> list[dict]:
    """Rows of every impl and baseline at ``shape``."""
    dtype = run.dtype
    inputs = fam.make_inputs(shape, dtype, run.device, seed=cfg.seed)
    ref = fam.reference(inputs)
    tol = fam.tolerance(dtype, run.device)
    rows = []

    def row(impl: str, config: dict | None, result: tuple[float, float, float, str], **extra: Any) -> dict:
        ms, spread, err, state = result
        bar.update()
        return kernel_row(run.env, fam, shape, dtype, impl, config, ms, spread, ceilings, cfg.kernel.metric,
                          rel_error=err, state=state, **extra)

    for impl in cfg.impls:
        if impl == "tuned":
            config, source = tuned_config(fam, shape, dtype, cfg)
        else:
            config, source = fam.default_config(shape, dtype), "default"
        result = measure(run, inputs, ref, lambda c=config: fam.run(inputs, c), fam.timed_call(inputs, config), tol,
                         contextlib.nullcontext())
        rows.append(row(impl, config, result, config_source=source))
    for name in baselines:
        call = lambda: fam.baseline(inputs)  # noqa: E731
        result = measure(run, inputs, ref, call, call, tol, baseline_backend(name))
        rows.append(row(name, None, result, config_source=""))
    return rows


@hydra.main(config_path="../conf", config_name="bench_kernels", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run = start(cfg, "bench_kernels")
    fam = family(cfg.kernel.name)
    unknown = sorted(set(cfg.impls) - set(IMPLS))
    if unknown:
        fail(f"impls {unknown} unknown; choose from {list(IMPLS)}")
    baselines = resolve_baselines(cfg.baselines, cfg.kernel.baselines, run.device)
    if baselines and type(fam).baseline is Family.baseline:
        print(f"{fam.name} has no baseline; timing {list(cfg.impls)} only")
        baselines = []
    try:
        shapes = shape_set(pick(cfg.shapes, run.device), fam)
    except ValueError as e:
        fail(str(e))
    ceilings = measure_ceilings(run.device, run.dtype)
    rows: list[dict] = []
    with tqdm(total=len(shapes) * (len(cfg.impls) + len(baselines)), desc=f"bench {fam.name}", unit="run") as bar:
        for shape in shapes:
            rows.extend(bench_shape(run, fam, shape, cfg, baselines, ceilings, bar))
            bar.set_postfix_str(f"{len(rows)} rows")
            if run.device == "cuda":
                torch.cuda.empty_cache()
    add_speedups(rows, baselines)
    run.finish(rows, _summary(fam.name, run.dtype, len(shapes), rows, baselines))


def _summary(name: str, dtype: str, n_shapes: int, rows: list[dict], baselines: list[str]) -> str:
    """'gemm float32, 4 shapes: tuned 0.91x, default 0.85x vs torch (geomean)'."""
    parts = []
    for impl in IMPLS:
        s = [r["speedup"] for r in rows if r["impl"] == impl and math.isfinite(r.get("speedup", math.nan))]
        if s:
            parts.append(f"{impl} {math.exp(sum(map(math.log, s)) / len(s)):.3g}x")
    versus = f" vs {'/'.join(baselines)} (geomean)" if parts else ""
    return f"{name} {dtype}, {n_shapes} shapes: {', '.join(parts) or 'no speedups'}{versus}"


if __name__ == "__main__":
    main()
