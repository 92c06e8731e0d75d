"""The results table: one row per measurement, one format for every app (tritonbench-style metrics).

Kernel rows carry: date, device, torch and triton versions, family, impl (trial | tuned | default |
a baseline's name), variant (the config's structural variant), dtype, shape and config (JSON),
median ms and its spread, TFLOP/s, GB/s, arithmetic intensity, the run's measured ceilings, the
fraction of the roofline reached, the baseline's ms and the speedup over it. Apps add their own
columns (sampler, trial, state, rel_error, ...). ``collate`` reads saved tables back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.measure import Ceilings


def kernel_row(
    env: dict[str, str],
    family: Any,
    shape: dict,
    dtype: str,
    impl: str,
    config: dict | None,
    ms: float,
    spread_ms: float,
    ceilings: Ceilings,
    metric: str,
    **extra: Any,
) -> dict[str, Any]:
    """A row for one timing of ``family`` at ``shape``. ``ms`` NaN (a failed run) leaves rates NaN.

    Fraction of roofline = the roofline's time, max(flops / peak FLOP/s, bytes / peak B/s) with the
    measured ceilings, over the measured time (1.0 = at the roof); it holds for kernels that do no
    arithmetic too.
    """
    flops, nbytes = float(family.flops(shape)), float(family.bytes(shape, dtype))
    ok = ms is not None and math.isfinite(ms) and ms > 0
    roof_ms = max(flops / (ceilings.tflops * 1e9), nbytes / (ceilings.gbps * 1e6))
    return {
        **env,
        "family": family.name,
        "impl": impl,
        "variant": (config or {}).get("variant", ""),
        "dtype": dtype,
        "shape": json.dumps(shape),
        "config": json.dumps(config, sort_keys=True) if config is not None else "",
        "ms": ms if ok else math.nan,
        "spread_ms": spread_ms if ok else math.nan,
        "tflops": flops / ms / 1e9 if ok else math.nan,
        "gbps": nbytes / ms / 1e6 if ok else math.nan,
        "intensity": flops / nbytes,
        "ceiling_tflops": ceilings.tflops,
        "ceiling_gbps": ceilings.gbps,
        "roofline_frac": roof_ms / ms if ok else math.nan,
        "metric": metric,
        **extra,
    }


def add_speedups(rows: list[dict], baseline_impls: list[str]) -> None:
    """Fill ``baseline``, ``baseline_ms`` and ``speedup`` (baseline ms / row ms) in place.

    Per (family, dtype, shape) the reference is the fastest of ``baseline_impls`` that ran.
    """
    best: dict[tuple, tuple[str, float]] = {}
    for r in rows:
        if r["impl"] in baseline_impls and math.isfinite(r["ms"]):
            key = (r["family"], r["dtype"], r["shape"])
            if key not in best or r["ms"] < best[key][1]:
                best[key] = (r["impl"], r["ms"])
    for r in rows:
        name, ms = best.get((r["family"], r["dtype"], r["shape"]), ("", math.nan))
        r["baseline"], r["baseline_ms"] = name, ms
        r["speedup"] = ms / r["ms"] if math.isfinite(ms) and math.isfinite(r["ms"]) else math.nan


def find_tables(paths: list[Path]) -> list[Path]:
    """Every results.csv in ``paths`` (files as given; folders searched recursively), sorted."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.csv")))
        else:
            raise FileNotFoundError(f"no such results file or folder: {p}")
    return found


def collate(paths: list[Path]) -> pd.DataFrame:
    """One table from the results.csv files under ``paths``, each row tagged with its ``run`` folder."""
    tables = find_tables(paths)
    if not tables:
        raise FileNotFoundError(f"no results.csv under {[str(p) for p in paths]}")
    return pd.concat([pd.read_csv(t).assign(run=str(t.parent)) for t in tables], ignore_index=True)
