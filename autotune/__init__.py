"""The autotuner: Optuna search over a kernel family's space, timing in crash-proof worker
processes, a per-device best-config cache, and tuned dispatch for the engine.

    import autotune
    res = autotune.tune("gemm", {"M": 16, "N": 4096, "K": 4096}, "bfloat16", n_trials=40)
    autotune.lookup("gemm", {"M": 16, "N": 4096, "K": 4096}, "bfloat16")["config"]
    autotune.tuned("gemm")(a, b)

Names import lazily, so that worker processes (which import :mod:`autotune.evaluate`) do not pay
for Optuna and pandas.
"""
from __future__ import annotations

import importlib

import kernels  # noqa: F401  (selects Triton's interpreter on a CPU-only machine before triton loads)

_PUBLIC = {
    "tune": "autotune.tuner",
    "TuneResult": "autotune.tuner",
    "TuneError": "autotune.tuner",
    "lookup": "autotune.cache",
    "CacheFileError": "autotune.cache",
    "tuned": "autotune.dispatch",
    "TunedDispatch": "autotune.dispatch",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
