"""A family's search space as Optuna distributions, and the geometry the tuner needs on it.

``family.space(shape, dtype)`` maps each tunable to its candidate values. Samplers learn more when
they know which candidates are ordered, so each parameter becomes:
- an integer range when the candidates are an arithmetic progression (``num_stages`` 2..5);
- an integer range over the exponent, named ``log2_<key>``, when they are powers of two whose
  exponents are an arithmetic progression (tile sizes 16..256, ``SPLIT_K`` 1..16);
- an integer range over the rank in sorted order, named ``rank_<key>``, for any other list of
  positive integers (GEMM tile widths 32, 64, 96, 128, 192, 256: about half a power of two a step);
- a categorical distribution otherwise (structural variants, booleans, irregular lists).

The same ordinal positions give a distance between configs, used to repair a proposal that the
family rejects (or that was already measured) into the nearest valid config not yet measured, and
to project a neighbouring shape's config onto this shape's candidates for warm starts.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from kernels.family import is_pow2

Config = dict[str, Any]


def config_key(config: Config) -> str:
    """A canonical string of a config (sorted JSON), used to spot duplicates."""
    return json.dumps(config, sort_keys=True)


def restrict(space: dict[str, list], only: dict[str, list] | None) -> dict[str, list]:
    """``space`` with the candidates of each parameter named in ``only`` cut down to those listed
    there (a sub-grid: "only the TMA variants, grouped order"). Values ``only`` lists that are not
    candidates for this shape are ignored; a parameter left with none, or one the space does not
    have, is a ValueError. None: the space unchanged."""
    if only is None:
        return space
    if not isinstance(only, dict):
        raise TypeError(f"a space restriction must be a dict of parameter -> allowed values, got {type(only).__name__}")
    out = dict(space)
    for key, allowed in only.items():
        if key not in space:
            raise ValueError(f"the space has no parameter {key!r}; its parameters are {sorted(space)}")
        if not isinstance(allowed, (list, tuple)) or not allowed:
            raise ValueError(f"restriction of {key!r} needs a non-empty list of values, got {allowed!r}")
        kept = [v for v in space[key] if v in allowed]
        if not kept:
            raise ValueError(f"none of {list(allowed)} is a candidate of {key!r} here; candidates are {space[key]}")
        out[key] = kept
    return out


def parse_restriction(text: str) -> dict[str, list]:
    """``"variant=tma_stream_k,tma;GROUP_M=8"`` -> ``{"variant": ["tma_stream_k", "tma"], "GROUP_M": [8]}``
    (integers where the values read as integers)."""
    out: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"restriction item {part!r} is not key=value[,value...]")
        out[key.strip()] = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in values.split(",")]
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _arithmetic(values: list[int]) -> bool:
    steps = {b - a for a, b in zip(values, values[1:])}
    return len(steps) == 1 and steps.pop() > 0


@dataclass(frozen=True)
class Param:
    """One tunable: its config key, Optuna name, candidates (sorted when ordinal) and encoding."""

    key: str
    name: str
    values: tuple
    kind: str  # "int", "log2", "rank" or "categorical"

    @property
    def ordinal(self) -> bool:
        return self.kind != "categorical"

    def distribution(self) -> BaseDistribution:
        if self.kind == "categorical":
            return CategoricalDistribution(list(self.values))
        codes = [self.encode(v) for v in self.values]
        step = codes[1] - codes[0] if len(codes) > 1 else 1
        return IntDistribution(codes[0], codes[-1], step=step)

    def encode(self, value: Any) -> Any:
        if self.kind == "log2":
            return int(math.log2(value))
        return self.values.index(value) if self.kind == "rank" else value

    def decode(self, code: Any) -> Any:
        if self.kind == "log2":
            return 1 << int(code)
        return self.values[int(code)] if self.kind == "rank" else code


def _param(key: str, values: list) -> Param:
    if len(values) >= 2 and all(_is_int(v) for v in values):
        ordered = sorted(values)
        if _arithmetic(ordered):
            return Param(key, key, tuple(ordered), "int")
        if all(is_pow2(v) for v in ordered) and _arithmetic([v.bit_length() for v in ordered]):
            return Param(key, f"log2_{key}", tuple(ordered), "log2")
        if ordered[0] > 0 and len(set(ordered)) == len(ordered):
            return Param(key, f"rank_{key}", tuple(ordered), "rank")
    return Param(key, key, tuple(values), "categorical")


class SearchSpace:
    """The parameters of one (family, shape, dtype) space and conversions between configs and trials."""

    def __init__(self, space: dict[str, list]):
        if not isinstance(space, dict) or not space:
            raise ValueError(f"a search space must be a non-empty dict of candidate lists, got {space!r}")
        for key, values in space.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"search space parameter {key!r} needs a non-empty list of candidates, got {values!r}")
        self.params = [_param(k, v) for k, v in space.items()]
        self.distributions: dict[str, BaseDistribution] = {p.name: p.distribution() for p in self.params}

    def encode(self, config: Config) -> dict[str, Any]:
        """Optuna parameters of a config."""
        return {p.name: p.encode(config[p.key]) for p in self.params}

    def decode(self, params: dict[str, Any]) -> Config:
        """The config of a trial's Optuna parameters."""
        return {p.key: p.decode(params[p.name]) for p in self.params}

    def project(self, config: Config) -> Config | None:
        """``config`` moved onto this space: each value outside the candidates is replaced by the
        nearest candidate (on a log scale for positive numbers). None when a key is missing or a
        categorical value has no counterpart here."""
        out: Config = {}
        for p in self.params:
            if p.key not in config:
                return None
            value = config[p.key]
            if value in p.values:
                out[p.key] = value
            elif p.ordinal and _is_int(value) and value > 0:
                out[p.key] = min(p.values, key=lambda c: (abs(math.log2(c) - math.log2(value)) if c > 0 else math.inf, c))
            else:
                return None
        return out

    def positions(self, configs: Iterable[Config]) -> np.ndarray:
        """[n, params] coordinates of configs: ordinal positions scaled to [0, 1], category indices."""
        rows = []
        for cfg in configs:
            row = []
            for p in self.params:
                i = p.values.index(cfg[p.key])
                row.append(i / max(1, len(p.values) - 1) if p.ordinal else float(i))
            rows.append(row)
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(self.params))

    def nearest(self, config: Config, candidates: list[Config], rng: random.Random) -> Config | None:
        """The candidate closest to ``config`` (ordinal distance plus one per differing category);
        ties broken by ``rng``. None when there are no candidates."""
        if not candidates:
            return None
        projected = self.project(config) or config
        here = self.positions([projected])[0]
        there = self.positions(candidates)
        ordinal = np.array([p.ordinal for p in self.params])
        diff = np.where(ordinal, np.abs(there - here), (there != here).astype(np.float64))
        dist = diff.sum(axis=1)
        best = np.flatnonzero(dist <= dist.min() + 1e-12)
        return candidates[int(best[rng.randrange(len(best))])]
