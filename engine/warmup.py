"""Warm-up before serving: the exact kernel shapes the engine launches, their configs, and tuning them.

The engine runs two kinds of steps: decode steps of b sequences (b one of the batch-size buckets
that CUDA graphs are captured at, attention bounded by the longest context the engine allows) and
prefill chunks of up to ``max_num_batched_tokens`` tokens. :func:`resolve_configs` runs one step of
each size as a dry run of the Triton backend (``TritonOps.dry_run``): every operator resolves its
config through tuned dispatch for the shape it is called with, and records it; nothing launches.
The rows it returns are the engine's shape set: (step, sequences, tokens, family, dtype, shape,
config, source), source being "exact", "nearest" or "default" (nothing cached near the shape).

:func:`tune_configs` runs ``autotune.tune`` with a small budget on each distinct (family, dtype,
shape) of such a set, which writes the winners into the best-config cache; the backend then
rereads the cache (``TritonOps.refresh``) and the next resolution finds them exactly.
"""
from __future__ import annotations

import json
import os
from typing import Any

from tqdm.auto import tqdm

from engine.model_runner import ModelRunner


def resolve_configs(
    runner: ModelRunner, decode_sizes: list[int], prefill_sizes: list[int], max_context_len: int
) -> list[dict[str, Any]]:
    """One row per (step, family, dtype, shape) that the engine's steps launch (see the module docstring).

    Decode steps of each of ``decode_sizes`` sequences at ``max_context_len``, and one-sequence
    prefill chunks of each of ``prefill_sizes`` tokens. Needs the Triton backend.
    """
    ops = runner.model.ops
    if not hasattr(ops, "dry_run"):
        raise ValueError(f"resolving kernel configs needs the Triton backend, the engine runs {ops.name!r}")
    steps = [("decode", b, 1, max_context_len) for b in decode_sizes] + [("prefill", 1, t, t) for t in prefill_sizes]
    rows: list[dict[str, Any]] = []
    for kind, seqs, query_len, context_len in steps:
        with ops.dry_run() as resolved:
            runner.run_dummy(seqs, query_len, context_len)
        rows += [{"step": kind, "seqs": seqs, "tokens": seqs * query_len, **r} for r in resolved.values()]
    return rows


def tune_configs(
    rows: list[dict[str, Any]],
    *,
    n_trials: int,
    sampler: str = "tpe",
    families: list[str] | None = None,
    cache_path: str | os.PathLike | None = None,
    storage: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """``autotune.tune`` on each distinct (family, dtype, shape) of ``rows`` (of ``families`` only,
    when given); one row per tuned shape with the winner, its median ms and the vendor baseline's.
    ``cache_path``/``storage``: the best-config cache and the Optuna storage (None: autotune's defaults)."""
    import autotune  # Optuna and the worker pool load only when tuning is asked for

    if n_trials < 1:
        raise ValueError(f"tuning needs n_trials >= 1, got {n_trials}")
    todo: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        if families is None or r["family"] in families:
            todo.setdefault((r["family"], r["dtype"], json.dumps(r["shape"], sort_keys=True)), r)
    out = []
    for r in tqdm(list(todo.values()), desc="tune engine shapes", unit="shape"):
        res = autotune.tune(r["family"], r["shape"], r["dtype"], n_trials=n_trials, sampler=sampler,
                            cache_path=cache_path, storage=storage, timeout_s=timeout_s)
        out.append({"family": r["family"], "dtype": r["dtype"], "shape": r["shape"], "config": res.config,
                    "ms": res.ms, "baseline_ms": res.baseline_ms, "trials": res.n_trials})
    return out
