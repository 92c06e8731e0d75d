"""Warm-up before serving: the exact kernel shapes the engine launches, their configs, and tuning them.

The engine runs two kinds of steps: decode steps of b sequences (b one of the batch-size buckets
that CUDA graphs are captured at, attention bounded by one of their context buckets, the last the
longest context the engine allows) and
prefill chunks of up to ``max_num_batched_tokens`` tokens. :func:`resolve_configs` runs one step of
each size as a dry run of the Triton backend (``TritonOps.dry_run``): every operator resolves its
config through tuned dispatch for the shape it is called with, and records it; nothing launches.
The rows it returns are the engine's shape set: (step, sequences, tokens, family, dtype, shape,
config, source), source being "exact", "nearest" or "default" (nothing cached near the shape).

:func:`tune_configs` runs ``autotune.tune`` with a small budget on each distinct (family, dtype,
shape) of such a set, which writes the winners into the best-config cache; the backend then
rereads the cache (``TritonOps.refresh``) and the next resolution finds them exactly.

:func:`compile_plan` lists the step sizes whose launch compiles every kernel binary that steps of
1..max tokens (and logits of 1..max rows) can launch, so that the warm-up compiles them all before
serving instead of the first request of a new size paying a compile (hundreds of ms to seconds: on an
H200 the online benchmark's p99 time to first token was 1.3 s, a compile, before this existed).
Triton compiles one binary per emitted module and per specialisation of its integer arguments
(equal to 1, divisible by 16, or neither); the varying token count is what moves a step between
them, and, with tuned configs, between modules: each token count resolves its own nearest config.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from tqdm.auto import tqdm

import kernels
from engine.cuda_graphs import context_buckets
from engine.model_runner import ModelRunner


def resolve_configs(
    runner: ModelRunner, decode_sizes: list[int], prefill_sizes: list[int], max_context_len: int
) -> list[dict[str, Any]]:
    """One row per (step, family, dtype, shape) that the engine's steps launch (see the module docstring).

    Decode steps of each of ``decode_sizes`` sequences at each context bucket of ``max_context_len``
    (``engine.cuda_graphs.context_buckets``), and one-sequence prefill chunks of each of
    ``prefill_sizes`` tokens. Needs the Triton backend.
    """
    ops = runner.model.ops
    if not hasattr(ops, "dry_run"):
        raise ValueError(f"resolving kernel configs needs the Triton backend, the engine runs {ops.name!r}")
    steps = [("decode", b, 1, cap) for b in decode_sizes for cap in context_buckets(max_context_len)]
    steps += [("prefill", 1, t, t) for t in prefill_sizes]
    rows: dict[tuple, dict[str, Any]] = {}  # a decode step's context buckets share their other shapes
    for kind, seqs, query_len, context_len in steps:
        with ops.dry_run() as resolved:
            runner.run_dummy(seqs, query_len, context_len)
        for key, r in resolved.items():
            rows.setdefault((kind, seqs, key), {"step": kind, "seqs": seqs, "tokens": seqs * query_len, **r})
    return list(rows.values())


def binary_key(row: dict[str, Any]) -> tuple:
    """What Triton compiles a resolved launch (a :func:`resolve_configs` / dry-run row) into: the
    emitted module of its (shape, dtype, config), and the specialisation class of each integer of its
    shape (== 1, divisible by 16; the kernel's integer arguments derive from them)."""
    _, module = kernels.get_family(row["family"]).resolve(row["shape"], row["dtype"], row["config"])
    classes = tuple((k, v == 1, v % 16 == 0) if isinstance(v, int) and not isinstance(v, bool) else (k, v)
                    for k, v in sorted(row["shape"].items()))
    return module.__name__, classes


@torch.inference_mode()
def compile_plan(runner: ModelRunner, max_tokens: int, max_rows: int) -> tuple[list[int], list[int]]:
    """(token counts, logits row counts): one-sequence prefill steps of those token counts, and the
    LM head on those numbers of rows, launch every kernel binary (:func:`binary_key`) that a step of
    1..``max_tokens`` tokens or the logits of 1..``max_rows`` rows launch. Each count is dry-run
    (nothing launches; the token counts as :func:`resolve_configs` prefill steps) and kept when it
    meets a binary no smaller count met. Needs the Triton backend."""
    seen: set[tuple] = set()

    def meets_new(resolved: list[dict[str, Any]]) -> bool:
        keys = {binary_key(r) for r in resolved} - seen
        seen.update(keys)
        return bool(keys)

    tokens = [t for t in range(1, max_tokens + 1) if meets_new(resolve_configs(runner, [], [t], t))]
    ops, rows = runner.model.ops, []
    hidden = torch.empty(max_rows, runner.config.hidden_size, dtype=runner.dtype, device=runner.device)
    for b in range(1, max_rows + 1):
        with ops.dry_run() as resolved:
            runner.model.logits(hidden[:b])
        if meets_new(list(resolved.values())):
            rows.append(b)
    return tokens, rows


@torch.inference_mode()
def compile_ahead(runner: ModelRunner, tokens: list[int], rows: list[int]) -> None:
    """Launch the steps of a :func:`compile_plan` once, which compiles their kernels (they write the
    KV cache: call it while the engine is idle)."""
    hidden = torch.zeros(max(rows, default=0), runner.config.hidden_size, dtype=runner.dtype, device=runner.device)
    for t in tqdm(tokens, desc="compile step sizes", unit="size", leave=False):
        runner.run_dummy(1, t, t)
    for b in rows:
        runner.model.logits(hidden[:b])


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
