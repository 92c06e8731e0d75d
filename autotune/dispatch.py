"""Tuned dispatch: a family's direct call with the config the cache holds for each shape.

``autotune.tuned("gemm")(a, b)`` computes ``kernels.gemm.matmul(a, b, config=...)``. The first
call of each (dtype, bucketed shape) looks the config up (exact, then nearest cached shape, see
:mod:`autotune.cache`) and checks it against the shape's constraints; a missing or no longer valid
config falls back to the family default (``config=None``). The answer is memoised, so later calls
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


def _call_dtype(args: tuple, kwargs: dict) -> str:
    """The dtype of a call: that of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return dtype_name(value.dtype)
    raise TypeError("tuned dispatch needs at least one tensor argument to know the dtype")


class TunedDispatch:
    """A family's direct call, launched with the cached config of each shape (see the module docstring)."""

    def __init__(self, family: str | Family, cache_path: str | os.PathLike | None = None, nearest: bool = True):
        self.family = families.resolve(family)
        self.cache_path: Path = cache.resolve_path(cache_path)
        self.nearest = nearest
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
            entry = cache.select(self._entries, self.family.name, dtype, shape, nearest=self.nearest)
            config, source = None, "default"
            if entry is not None:
                try:
                    config = self.family.check_config(shape, dtype, entry["config"])
                    source = entry["match"]
                except (ValueError, TypeError):
                    pass  # a neighbour's config that this shape cannot run: the default it is
            self.sources[key] = source
            self._memo[key] = config
            return config


_DISPATCHERS: dict[tuple, TunedDispatch] = {}


def tuned(family: str | Family, *, cache_path: str | os.PathLike | None = None, nearest: bool = True) -> TunedDispatch:
    """The tuned-dispatch callable of ``family`` (one shared instance per family and cache file)."""
    fam = families.resolve(family)
    key = (families.reference(fam), str(cache.resolve_path(cache_path)), nearest)
    if key not in _DISPATCHERS:
        _DISPATCHERS[key] = TunedDispatch(fam, cache_path, nearest)
    return _DISPATCHERS[key]
