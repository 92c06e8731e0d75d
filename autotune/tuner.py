"""``autotune.tune``: one Optuna study per (device, family, dtype, shape), confirmed, then cached.

Steps of one call:
1. the study named ``<family>|<dtype>|<shape>|<device key>|<template hash>`` is created or loaded
   from the storage (SQLite ``results/optuna.db`` by default; any Optuna RDB URL or storage object);
   a template change starts a new study, as old timings no longer describe the emitted kernels;
2. warm start: the family's default config and the cached winners of the nearest shapes (same
   family, dtype and device; the exact shape's old winner first) are enqueued;
3. the search (:func:`autotune.search.run_search`) fills the study up to ``n_trials`` evaluated
   trials, each evaluated in a worker process (:mod:`autotune.worker`, :mod:`autotune.evaluate`);
4. confirmation: the ``confirm_top`` fastest distinct configs and the family's baseline are
   re-timed interleaved in one worker; the best median wins. The confirmation is stored in the
   study, so rerunning a finished call measures nothing;
5. the winner and its provenance are merged into the device's cache file (:mod:`autotune.cache`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage
from tqdm.auto import tqdm

from autotune import cache, families
from autotune.evaluate import Timing
from autotune.paths import default_storage_url
from autotune.search import SAMPLERS, counted, make_sampler, result_of, run_search
from autotune.space import Config, SearchSpace, config_key, restrict
from autotune.worker import WorkerPool, shared_pool
from kernels.device import default_device, device_facts
from kernels.family import Family, torch_dtype
from kernels.generator import template_hash

SEARCH_TIMING = Timing(warmup_ms=10.0, rep_ms=40.0, cpu_runs=3)
CONFIRM_TIMING = Timing(warmup_ms=10.0, rep_ms=50.0, cpu_runs=3)
CONFIRM_ROUNDS = {"cuda": 5, "cpu": 3}
WARM_NEIGHBOURS = 3


class TuneError(RuntimeError):
    """No candidate of the study passed its checks: there is nothing to cache."""


@dataclass
class TuneResult:
    """The winner of a tuning call and how it was found.

    ``config``/``ms`` (confirmed median) / ``ms_p20``/``ms_p80`` (its spread) / ``baseline_ms``
    (the family's vendor baseline timed alongside, or None); ``n_trials``: evaluated trials in the
    study, ``new_trials``: of them run by this call; ``key``: the cache key; ``entry``: the cache
    entry written; ``trials``: one row per trial of the study (status, reason, ms, config).
    """

    config: Config
    ms: float
    n_trials: int
    key: str
    ms_p20: float
    ms_p80: float
    baseline_ms: float | None
    new_trials: int
    failed_trials: int
    sampler: str
    study_name: str
    cache_path: Path
    entry: dict[str, Any]
    trials: pd.DataFrame

    @property
    def speedup(self) -> float | None:
        """Baseline time over tuned time (above 1: faster than the vendor library)."""
        return self.baseline_ms / self.ms if self.baseline_ms else None


_STORAGES: dict[str, BaseStorage] = {}


def resolve_storage(storage: str | os.PathLike | BaseStorage | None) -> BaseStorage:
    """An Optuna storage: the default SQLite file, a database URL, a ``.db`` path, or a storage object."""
    if isinstance(storage, BaseStorage):
        return storage
    if storage is None:
        url = default_storage_url()
    elif isinstance(storage, (str, os.PathLike)):
        url = str(storage) if "://" in str(storage) else f"sqlite:///{Path(storage).resolve()}"
    else:
        raise TypeError(f"storage must be None, a URL, a path or an optuna storage, got {type(storage).__name__}")
    if url not in _STORAGES:
        _STORAGES[url] = _sqlite_storage(url) if url.startswith("sqlite:///") else RDBStorage(url)
    return _STORAGES[url]


def _sqlite_storage(url: str) -> RDBStorage:
    """An SQLite storage tuned for many small commits (Optuna commits every parameter of a trial):
    write-ahead logging and fsync at checkpoints only, and a long lock wait, since several processes
    may share the file."""
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
    storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    storage.engine.dispose()  # connections opened before the listener reconnect with it
    return storage


def study_name(family: Family, shape: dict, dtype: str, only: dict[str, list] | None = None) -> str:
    """``<family>|<dtype>|<shape>|<device key>|<template hash>|grid=<digest>``: one study per tuning
    problem. The digest is of the shape's whole search space: a space that changed without its
    template (a value added to a categorical parameter) is a new problem, and Optuna could not
    resume the old study with it ("CategoricalDistribution does not support dynamic value space").
    A search restricted to a sub-grid is a problem of its own (``|space=<the restriction>``)."""
    grid = hashlib.sha256(json.dumps(family.space(shape, dtype), sort_keys=True).encode()).hexdigest()[:8]
    name = f"{family.name}|{dtype}|{cache.shape_key(shape)}|{device_facts().key}|{template_hash(family)}|grid={grid}"
    return name if only is None else f"{name}|space={json.dumps(only, sort_keys=True, separators=(',', ':'))}"


def warm_configs(fam: Family, shape: dict, dtype: str, entries: dict[str, dict],
                 device_key: str | None = None) -> list[Config]:
    """The default config, then the cached winners of the shapes nearest to ``shape`` (same family,
    dtype and device -- ``device_key``, default this machine's; the exact shape's own earlier
    winner first)."""
    device_key = device_key or device_facts().key
    scored = []
    for key, entry in entries.items():
        if (entry.get("family"), entry.get("dtype"), entry.get("device_key")) != (fam.name, dtype, device_key):
            continue
        d = cache.shape_distance(shape, entry.get("shape", {}))
        if d is not None:
            scored.append((*d, key, entry["config"]))
    scored.sort(key=lambda s: s[:3])
    return [fam.default_config(shape, dtype)] + [s[3] for s in scored[:WARM_NEIGHBOURS]]


class _WorkerEvaluator:
    """Evaluates configs of one (family, shape, dtype) in a :class:`WorkerPool`."""

    def __init__(self, pool: WorkerPool, family_ref: str, shape: dict, dtype: str, timeout_s: float):
        self.pool, self.timeout_s = pool, timeout_s
        self.msg = {"family": family_ref, "shape": dict(shape), "dtype": dtype, "seed": 0}
        self._started = False

    def _start(self) -> None:
        # All processes at once, and only when there is work (a finished study needs none).
        if not self._started:
            self.pool.start()
            self._started = True

    def precompile(self, config: Config):
        self._start()
        return self.pool.precompile({**self.msg, "config": config}, timeout=self.timeout_s)

    def evaluate(self, config: Config) -> dict[str, Any]:
        self._start()
        msg = {**self.msg, "op": "evaluate", "config": config, "timing": dataclasses.asdict(SEARCH_TIMING)}
        return self.pool.evaluate(msg, self.timeout_s)

    def confirm(self, configs: list[Config], rounds: int) -> dict[str, Any]:
        self._start()
        msg = {**self.msg, "op": "confirm", "configs": configs, "rounds": rounds, "baseline": True,
               "timing": dataclasses.asdict(CONFIRM_TIMING)}
        return self.pool.evaluate(msg, self.timeout_s * (len(configs) + 1))


def _confirm(study: optuna.Study, evaluator: _WorkerEvaluator, top: int) -> dict[str, Any]:
    """The confirmed winner: the ``top`` fastest distinct configs re-timed interleaved (or reused
    from the study when those candidates were confirmed before)."""
    trials = counted(study.get_trials(deepcopy=False))
    passed = sorted((t for t in trials if result_of(t).get("status") == "ok"), key=lambda t: result_of(t)["ms"])
    if not passed:
        reasons = Counter(result_of(t).get("reason", "?") for t in trials)
        summary = "; ".join(f"{n}x {r}" for r, n in reasons.most_common(5))
        raise TuneError(f"study {study.study_name!r}: none of {len(trials)} evaluated configs passed ({summary})")
    candidates, seen = [], set()
    for t in passed:
        if config_key(t.user_attrs["config"]) not in seen:
            seen.add(config_key(t.user_attrs["config"]))
            candidates.append(t)
    candidates = candidates[: max(1, top)]
    numbers = [t.number for t in candidates]
    stored = study.user_attrs.get("confirmation")
    if stored and stored.get("candidates") == numbers:
        return stored
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    best = candidates[0]
    confirmation = {"candidates": numbers, "winner": best.number, **_timing(result_of(best)), "baseline": None,
                    "confirmed": False, "date": date}
    if top > 0:
        reply = evaluator.confirm([t.user_attrs["config"] for t in candidates], CONFIRM_ROUNDS.get(default_device().type, 3))
        if reply.get("status") == "ok":
            timed = [(r["ms"], t.number, r) for t, r in zip(candidates, reply["results"]) if r["status"] == "ok"]
            if timed:
                _, number, r = min(timed, key=lambda x: x[:2])
                confirmation.update(winner=number, **_timing(r), confirmed=True)
            base = reply.get("baseline")
            if base and base.get("status") == "ok":
                confirmation["baseline"] = _timing(base)
    study.set_user_attr("confirmation", confirmation)
    return confirmation


def _timing(r: dict) -> dict[str, float]:
    return {"ms": r["ms"], "ms_p20": r["ms_p20"], "ms_p80": r["ms_p80"]}


def _trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        res = result_of(t)
        rows.append({
            "number": t.number, "state": t.state.name, "status": res.get("status"), "reason": res.get("reason"),
            "ms": res.get("ms"), "ms_p20": res.get("ms_p20"), "ms_p80": res.get("ms_p80"),
            "config": t.user_attrs.get("config"),
        })
    return pd.DataFrame(rows, columns=["number", "state", "status", "reason", "ms", "ms_p20", "ms_p80", "config"])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tune(
    family: str | Family,
    shape: dict[str, Any],
    dtype: str,
    *,
    n_trials: int | None = 50,
    sampler: str = "tpe",
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
    storage: str | os.PathLike | BaseStorage | None = None,
    warm_start: bool = True,
    confirm_top: int = 3,
    timeout_s: float = 60.0,
    compile_workers: int | None = None,
    progress: bool = False,
    space: dict[str, list] | None = None,
) -> TuneResult:
    """Tune ``family`` for ``shape`` and ``dtype`` on this machine's device and cache the winner.

    ``family``: a registered name or a Family instance (defined at module level, so that worker
    processes can import it). ``n_trials``: the study's total budget of evaluated trials (None: every
    valid config); rejected and duplicate proposals are free (see :mod:`autotune.search`).
    ``sampler``: "tpe", "gp", "random" or "exhaustive" (every valid config once, in an order shuffled
    by ``seed``). ``cache_path``/``storage`` None: the defaults under ``results/``. ``warm_start``:
    enqueue the default config and the nearest cached winners first. ``confirm_top``: candidates
    re-timed at the end (0: take the search's best). ``timeout_s``: limit of one candidate's
    evaluation (compile, check and timing), and of its compilation in a helper.
    ``compile_workers``: helper processes compiling ahead (default: half the CPU cores, at most 8,
    on a GPU; none on the CPU interpreter). ``progress``: a tqdm bar of the budget. ``space``: search
    only a sub-grid of the family's space, e.g. ``{"variant": ["tma_stream_k"], "GROUP_M": [8]}``
    (see :func:`autotune.space.restrict`); None: the whole space.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no log line per trial; results are in the study
    try:
        return _tune(family, shape, dtype, n_trials, sampler, seed, cache_path, storage, warm_start, confirm_top,
                     timeout_s, compile_workers, progress, space)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _tune(family, shape, dtype, n_trials, sampler, seed, cache_path, storage, warm_start, confirm_top,
          timeout_s, compile_workers, progress, only) -> TuneResult:
    fam = families.resolve(family)
    ref = families.reference(fam)
    torch_dtype(dtype)
    cache.shape_key(shape)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1):
        raise ValueError(f"n_trials must be a positive int or None (every valid config), got {n_trials!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    grid = restrict(fam.space(shape, dtype), only)
    space = SearchSpace(grid)
    valid = [c for c in fam.configs(shape, dtype) if all(c[k] in grid[k] for k in grid)]
    if not valid:
        raise ValueError(f"{fam.name}: no valid config for shape {shape} and dtype {dtype}"
                         + (f" within {only}" if only is not None else ""))
    budget = len(valid) if n_trials is None else n_trials
    path = cache.resolve_path(cache_path)
    entries = cache.read(path)  # a corrupt cache fails here, before any trial is spent

    if compile_workers is None:
        compile_workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if default_device().type == "cuda" else 0
    name = study_name(fam, shape, dtype, only)
    study = optuna.create_study(
        study_name=name, storage=resolve_storage(storage), sampler=make_sampler(sampler, seed, budget),
        direction="minimize", load_if_exists=True,
    )
    if "family" not in study.user_attrs:
        for k, v in {"family": fam.name, "dtype": dtype, "shape": dict(shape), "device": device_facts().name,
                     "template_hash": template_hash(fam), "objective": "ln(median ms)"}.items():
            study.set_user_attr(k, v)

    order = None
    if sampler == "exhaustive":
        order = list(valid)
        random.Random(seed).shuffle(order)
    warm = warm_configs(fam, shape, dtype, entries) if warm_start and sampler != "exhaustive" else []
    evaluator = _WorkerEvaluator(shared_pool(compile_workers), ref, shape, dtype, timeout_s)
    spent = len(counted(study.get_trials(deepcopy=False))) if progress else 0
    with tqdm(total=budget, initial=spent, disable=not progress, desc=f"{fam.name} {cache.shape_key(shape)}",
              leave=False) as bar:
        report = run_search(
            study, space, valid, lambda c: fam.reject(shape, dtype, c), budget, evaluator,
            warm=warm, order=order, lookahead=max(1, compile_workers), seed=seed,
            on_result=lambda _: bar.update(1),
        )
    confirmation = _confirm(study, evaluator, confirm_top)

    trials = counted(study.get_trials(deepcopy=False))
    winner = next(t for t in trials if t.number == confirmation["winner"])
    facts = device_facts()
    baseline = confirmation.get("baseline")
    entry = {
        "family": fam.name, "dtype": dtype, "shape": dict(shape), "config": winner.user_attrs["config"],
        "ms": confirmation["ms"], "ms_p20": confirmation["ms_p20"], "ms_p80": confirmation["ms_p80"],
        "baseline_ms": baseline["ms"] if baseline else None, "confirmed": confirmation["confirmed"],
        "trials": len(trials), "failed_trials": sum(result_of(t).get("status") == "failed" for t in trials),
        "sampler": sampler, "seed": seed, "study": name,
        "device": facts.name, "device_key": facts.key, "capability": list(facts.capability),
        "triton": _version("triton"), "torch": _version("torch"), "template_hash": template_hash(fam),
        "date": confirmation["date"],
    }
    if only is not None:
        entry["space"] = only  # the winner of a sub-grid only
    cache.write(path, [entry])
    return TuneResult(
        config=entry["config"], ms=entry["ms"], n_trials=entry["trials"],
        key=cache.entry_key(fam.name, dtype, shape), ms_p20=entry["ms_p20"], ms_p80=entry["ms_p80"],
        baseline_ms=entry["baseline_ms"], new_trials=report.new_trials, failed_trials=entry["failed_trials"],
        sampler=sampler, study_name=name, cache_path=path, entry=entry, trials=_trials_table(study),
    )
