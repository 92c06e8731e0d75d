"""Tuned dispatch: a family's direct call with the config the cache holds for each shape.

``autotune.tuned("gemm")(a, b)`` computes ``kernels.gemm.matmul(a, b, config=...)``. The first
call of each (dtype, bucketed shape) looks the config up (exact, then nearest cached shape, see
:mod:`autotune.cache`) whose config passes the shape's constraints (an entry whose config does not
is passed over for the next nearest); no such entry falls back to the family default
(``config=None``), and so does a nearest shape farther than ``max_distance`` (default
:data:`NEAREST_MAX_DISTANCE`) in the cache's log distance.

Why a limit: a config is tuned for its shape's tile counts. The engine's GEMMs run at many M (the
tokens of a step), and the 128x128 tile tuned at M = 2048 (192 tiles of 128x256 there: 1.45 waves
on 132 SMs) is the wrong choice at M = 4096, where the default's wave rule picks 128x256 (2.9 full
waves). With every neighbour trusted, the tuned engine ran the H200 offline workload at 0.95x the
default-config engine (results/bench_engine_nvidia_h200/, 2026-11-27); the defaults adapt to the
shape, a far neighbour's config does not. The answer is memoised, so later calls
cost the shape extraction, one tuple and one dict lookup: this is what the engine calls on its
hot path. The cache file is read once per dispatcher (:meth:`TunedDispatch.refresh` rereads it).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from autotune import cache, families
from kernels.family import Config, Family, dtype_name

# ln(1.25): a neighbour within a quarter in one dimension (or less in several) is trusted.
NEAREST_MAX_DISTANCE = 0.223


def _call_dtype(args: tuple, kwargs: dict) -> str:
    """The dtype of a call: that of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return dtype_name(value.dtype)
    raise TypeError("tuned dispatch needs at least one tensor argument to know the dtype")


class TunedDispatch:
    """A family's direct call, launched with the cached config of each shape (see the module docstring)."""

    def __init__(self, family: str | Family, cache_path: str | os.PathLike | None = None, nearest: bool = True,
                 max_distance: float | None = NEAREST_MAX_DISTANCE):
        self.family = families.resolve(family)
        self.cache_path: Path = cache.resolve_path(cache_path)
        self.nearest = nearest
        self.max_distance = max_distance  # None: any nearest shape
        self._entries: dict[str, dict] | None = None
        self._memo: dict[tuple, Config | None] = {}
        self.sources: dict[tuple, str] = {}  # memo key -> "exact", "nearest" or "default"
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fam = self.family
        shape = fam.bucket(fam.shape_from_call(*args, **kwargs))
        key = (_call_dtype(args, kwargs), *sorted(shape.items()))
        try:
            config = self._memo[key]
        except KeyError:
            config = self._resolve(key, shape)
        return fam.call(*args, config=config, **kwargs)

    def config_for(self, shape: dict[str, Any], dtype: str) -> tuple[Config | None, str]:
        """(config, source) that a call of ``shape`` and ``dtype`` uses; config None is the default."""
        shape = self.family.bucket(shape)
        key = (dtype, *sorted(shape.items()))
        config = self._memo[key] if key in self._memo else self._resolve(key, shape)
        return config, self.sources[key]

    def refresh(self) -> None:
        """Forget memoised configs and reread the cache file at the next call."""
        with self._lock:
            self._entries = None
            self._memo.clear()
            self.sources.clear()

    def _resolve(self, key: tuple, shape: dict[str, Any]) -> Config | None:
        with self._lock:
            if key in self._memo:
                return self._memo[key]
            if self._entries is None:
                self._entries = cache.read(self.cache_path)
            dtype = key[0]

            def runs(entry: dict[str, Any]) -> bool:
                try:
                    self.family.check_config(shape, dtype, entry["config"])
                    return True
                except (ValueError, TypeError):
                    return False

            # A neighbour too far for its tile choices to carry over is no match: the default adapts.
            # One whose config this shape cannot run (another variant set: the rope-fused decode
            # has no general variant) gives way to the next nearest.
            entry = cache.select(self._entries, self.family.name, dtype, shape, nearest=self.nearest,
                                 max_distance=self.max_distance, accept=runs)
            config, source = None, "default"
            if entry is not None:
                config, source = self.family.check_config(shape, dtype, entry["config"]), entry["match"]
            self.sources[key] = source
            self._memo[key] = config
            return config


_DISPATCHERS: dict[tuple, TunedDispatch] = {}


def tuned(family: str | Family, *, cache_path: str | os.PathLike | None = None, nearest: bool = True,
          max_distance: float | None = NEAREST_MAX_DISTANCE) -> TunedDispatch:
    """The tuned-dispatch callable of ``family`` (one shared instance per family, cache file and
    lookup policy). ``max_distance``: the farthest nearest shape whose config is used (None: any)."""
    fam = families.resolve(family)
    key = (families.reference(fam), str(cache.resolve_path(cache_path)), nearest, max_distance)
    if key not in _DISPATCHERS:
        _DISPATCHERS[key] = TunedDispatch(fam, cache_path, nearest, max_distance)
    return _DISPATCHERS[key]
