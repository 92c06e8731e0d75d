"""Attention suite: issue 4's targets, the attention families against PyTorch's SDPA, in bfloat16.

    python -m experiments.attention_suite                  # the GPU suite (about 6 minutes on an H100)
    python -m experiments.attention_suite --quick          # tiny shapes, runs on the CPU interpreter
    python -m experiments.attention_suite --suites decode  # only the paged decode points

Points:
- prefill (attention_prefill), H 32, equal lengths: D128 causal B4 L4096 (the headline), D128
  non-causal B4 L4096, D128 causal B16 L1024 and B1 L16384, D64 causal B4 L4096; baselines SDPA
  with the flash and the cuDNN backend (``torch.nn.attention.sdpa_kernel``) on [B, H, L, D] views
  of the same tensors;
- decode (attention_paged, query_len 1), Hq 32, Hkv 8, D 128, block 16, at (B, L) = (1, 4096),
  (32, 1024), (64, 2048), (128, 4096), (8, 32768); baselines SDPA over a contiguous cache of the
  same shape (enable_gqa=True) with PyTorch's own backend choice and with flash and
  memory-efficient forced, and the device copy bandwidth (a 1 GiB device-to-device copy, bytes
  read + written) as the memory roofline.

For each point: the float64 reference once, then every candidate (the family's default config and
up to ``--cap`` configs of ``configs()`` nearest to it or, on a GPU, to the device cache's config for
the point, compiled ahead in a pool of processes) runs
on a NaN-poisoned output and must match the reference before it is timed (cold-L2 launches
replayed in a CUDA graph, as the autotuner times; median). Writes one CSV (a row per point and kind: default, best, each baseline) with ms, TFLOP/s,
TB/s, fraction of the roofline max(flops / matmul peak, bytes / copy bandwidth) -- both measured in
this run --, the speedup over each baseline, the config, device, versions and date; prints the
table and the issue's targets, met or not. On a GPU each point's best config is merged into the
device's best-config cache (``results/cache/<device>.json``, what tuned dispatch reads) unless
``--no-cache``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

import kernels
from autotune import cache
from experiments.measure import measure_ceilings, time_ms
from experiments.suite import precompile, run_meta
from kernels.device import default_device, device_facts
from kernels.family import Family, config_steps, rel_error
from kernels.generator import template_hash

HEADS = {"heads_q": 32, "heads_kv": 32}
PREFILL = [
    {"batch": 4, "seqlen": 4096, **HEADS, "head_dim": 128, "causal": True},
    {"batch": 4, "seqlen": 4096, **HEADS, "head_dim": 128, "causal": False},
    {"batch": 16, "seqlen": 1024, **HEADS, "head_dim": 128, "causal": True},
    {"batch": 1, "seqlen": 16384, **HEADS, "head_dim": 128, "causal": True},
    {"batch": 4, "seqlen": 4096, **HEADS, "head_dim": 64, "causal": True},
]
DECODE = [
    {"batch": b, "query_len": 1, "context_len": L, "heads_q": 32, "heads_kv": 8, "head_dim": 128, "block_size": 16}
    for b, L in ((1, 4096), (32, 1024), (64, 2048), (128, 4096), (8, 32768))
]
QUICK_PREFILL = [{"batch": 2, "seqlen": 48, "heads_q": 2, "heads_kv": 1, "head_dim": 64, "causal": True}]
QUICK_DECODE = [{"batch": 2, "query_len": 1, "context_len": 100, "heads_q": 4, "heads_kv": 2, "head_dim": 64,
                 "block_size": 16}]
PREFILL_BASELINES = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
DECODE_BASELINES = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}


def candidates(fam: Family, shape: dict, dtype: str, cap: int, known: dict | None = None) -> list[dict]:
    """The default config, then the ``cap`` valid configs nearest to it or to ``known`` (a config
    tuned for this shape before, when it is valid here; it comes first), ties in enumeration order.
    The nearest-to-default neighbourhood alone can miss the region where the winner lies: at decode
    B32 L1024 the default splits the context, and the winner (no split, 128-key tiles, 2 stages)
    was not among the 150 configs nearest to it."""
    default = fam.default_config(shape, dtype)
    valid = fam.configs(shape, dtype)
    centres = [default] + ([known] if known in valid else [])
    rest = sorted((c for c in valid if c != default),
                  key=lambda c: min(sum(config_steps(c, centre)) for centre in centres))
    return [default] + rest[:cap]


def known_config(fam: Family, shape: dict, dtype: str) -> dict | None:
    """The config of the device cache's entry for exactly this shape (None without one)."""
    hit = cache.lookup(fam, shape, dtype, nearest=False)
    return None if hit is None else hit["config"]


def cached_or_default(fam: Family, shape: dict, dtype: str) -> dict:
    """The device cache's config for exactly this shape, else the family's default."""
    return known_config(fam, shape, dtype) or fam.default_config(shape, dtype)


def decode_points(indices: str, quick: bool) -> list[dict]:
    """The decode points at ``indices`` (comma-separated, into :data:`DECODE`), or the quick ones."""
    return QUICK_DECODE if quick else [DECODE[int(i)] for i in indices.split(",")]


def compile_shape(fam: Family, shape: dict) -> dict:
    """A smaller shape whose launches compile the same kernels: one sequence (a kernel's arguments
    are strides and head counts, fixed by the heads and head dim), a prefill of at most 1024 tokens."""
    if fam.name == "attention_prefill":
        return {**shape, "batch": 1, "seqlen": min(shape["seqlen"], 1024)}
    return {**shape, "batch": 1}


def _backend(name: str | None) -> contextlib.AbstractContextManager:
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def _checked(fn: Callable[[], torch.Tensor], inputs: dict, ref: torch.Tensor, tol: float) -> tuple[float, str]:
    """(rel error, state) of ``fn()`` on a NaN-poisoned output."""
    inputs["out"].fill_(float("nan"))
    try:
        out = fn()
    except Exception as e:  # a backend that cannot run this shape, a kernel that fails at run time
        return math.nan, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if out is None:
        return math.nan, "no result for these inputs"
    err = rel_error(out, ref)
    return err, "ok" if err <= tol else f"wrong: rel error {err:.3g} > {tol:.1g}"


def checked_ms(fn: Callable[[], torch.Tensor], timed: Callable[[], object], inputs: dict, ref: torch.Tensor,
               tol: float, device: str) -> tuple[float, float, str]:
    """(ms, rel error, state): ``fn()`` checked on a NaN-poisoned output, then, if right, ``timed()``
    timed (NaN ms otherwise)."""
    err, state = _checked(fn, inputs, ref, tol)
    return (time_ms(timed, device).ms if state == "ok" else math.nan), err, state


def baselines_ms(fam: Family, inputs: dict, ref: torch.Tensor, tol: float, baselines: dict[str, str | None],
                 device: str) -> dict[str, tuple[float, float, str]]:
    """(ms, rel error, state) of each baseline (name: its SDPA backend, None for PyTorch's choice)."""
    out = {}
    for name, backend in baselines.items():
        with _backend(backend):
            out[name] = checked_ms(lambda: fam.baseline(inputs), lambda: fam.baseline(inputs), inputs, ref, tol, device)
    return out


def run_point(fam: Family, kind: str, shape: dict, dtype: str, cfgs: list[dict], failed: dict[int, str],
              meta: dict, baselines: dict[str, str | None], device: torch.device, deadline: float) -> list[dict]:
    """The rows of one point: each baseline, the default config and the best candidate."""
    inputs = fam.make_inputs(shape, dtype, device, seed=1)
    ref = fam.reference(inputs)
    tol = fam.tolerance(dtype, device)
    flops, nbytes = fam.flops(shape), fam.bytes(shape, dtype)
    roof_ms = max(flops / (meta["peak_TFLOPs"] * 1e9), nbytes / (meta["copy_GBps"] * 1e6))

    def row(name: str, cfg: dict | None, ms: float, err: float, state: str, tried: int = 1, bad: int = 0) -> dict:
        return {**meta, "suite": kind, "dtype": dtype, **shape, "shape": json.dumps(shape), "kind": name,
                "config": json.dumps(cfg) if cfg else "",
                "ms": ms, "TFLOPs": flops / ms / 1e9, "TBps": nbytes / ms / 1e9, "roofline_frac": roof_ms / ms,
                "rel_error": err, "state": state, "tried": tried, "failed": bad}

    rows = [row(name, None, *got) for name, got in baselines_ms(fam, inputs, ref, tol, baselines, device.type).items()]

    timed: list[tuple[float, float, dict]] = []
    bad = 0
    for i, cfg in enumerate(cfgs):
        if i > 0 and time.time() > deadline:
            break  # the suite's time is spent: keep the default, skip the rest of the sampling
        if i in failed:
            bad += 1
            print(f"  compile failed {json.dumps(cfg)}: {failed[i]}")
            continue
        ms, err, state = checked_ms(lambda: fam.run(inputs, cfg), fam.timed_call(inputs, cfg), inputs, ref, tol,
                                    device.type)
        if state != "ok":
            bad += 1
            print(f"  {state} {json.dumps(cfg)}")
            continue
        timed.append((ms, err, cfg))
    default = next(((ms, err) for ms, err, c in timed if c == cfgs[0]), None)
    rows.append(row("default", cfgs[0], *(default if default else (math.nan, math.nan)),
                    "ok" if default else "default config failed"))
    if timed:
        ms, err, cfg = min(timed, key=lambda t: t[0])
        rows.append(row("best", cfg, ms, err, "ok", tried=len(timed) + bad, bad=bad))
    base = {r["kind"]: r["ms"] for r in rows if r["kind"] in baselines}
    for r in rows:
        for name, ms in base.items():
            r[f"speedup_vs_{name}"] = ms / r["ms"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def cache_entries(df: pd.DataFrame, dtype: str) -> list[dict]:
    """Best-config cache entries (autotune/cache.py's format) of each point's best config."""
    entries = []
    for r in df[df["kind"] == "best"].to_dict("records"):
        fam = kernels.get_family("attention_prefill" if r["suite"] == "prefill" else "attention_paged")
        base = r.get("speedup_vs_sdpa_flash" if r["suite"] == "prefill" else "speedup_vs_sdpa", math.nan)
        entries.append({
            "family": fam.name, "dtype": dtype, "shape": json.loads(r["shape"]), "config": json.loads(r["config"]),
            "ms": r["ms"], "ms_p20": None, "ms_p80": None, "baseline_ms": r["ms"] * base if base == base else None,
            "confirmed": False, "trials": int(r["tried"]), "failed_trials": int(r["failed"]),
            "sampler": "attention_suite (capped brute force)", "seed": None, "study": None,
            "device": r["device"], "device_key": device_facts().key, "capability": list(device_facts().capability),
            "triton": r["triton"], "torch": r["torch"], "template_hash": template_hash(fam), "date": r["date"],
        })
    return entries


def report_targets(df: pd.DataFrame) -> list[str]:
    """Issue 4's targets against the best configs of this run, one line each."""
    lines = []
    best = df[df["kind"] == "best"]
    prefill = best[best["suite"] == "prefill"]
    head = prefill if prefill.empty else prefill[
        (prefill["batch"] == 4) & (prefill["seqlen"] == 4096) & (prefill["head_dim"] == 128)
        & (prefill["causal"] == True)]  # noqa: E712 (pandas mask)
    for r in head.itertuples():
        for name, want in (("sdpa_flash", 1.3), ("sdpa_cudnn", 0.85)):
            got = getattr(r, f"speedup_vs_{name}", math.nan)
            lines.append(f"prefill B4 H32 L4096 D128 causal: {r.TFLOPs:.0f} TFLOP/s, {got:.2f}x {name} "
                         f"(target >= {want}x): {'met' if got >= want else 'NOT met'}")
    for r in best[best["suite"] == "decode"].itertuples():
        got = getattr(r, "speedup_vs_sdpa", math.nan)
        line = f"decode B{r.batch} L{int(r.context_len)}: {r.TBps:.2f} TB/s, {got:.2f}x sdpa (target >= 0.95x): " \
               f"{'met' if got >= 0.95 else 'NOT met'}"
        if (r.batch, r.context_len) in ((64, 2048), (8, 32768)):
            line += f"; {r.roofline_frac:.0%} of copy bandwidth (target >= 80%): " \
                    f"{'met' if r.roofline_frac >= 0.8 else 'NOT met'}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.attention_suite", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, float16 (runs on the CPU interpreter)")
    parser.add_argument("--cap", type=int, help="configs tried per point besides the default (default 40, quick 2)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop trying configs after this many seconds")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--out", help="CSV path (default results/attention_suite_<device>.csv)")
    parser.add_argument("--no-cache", action="store_true", help="do not merge the winners into the device's cache")
    parser.add_argument("--suites", default="prefill,decode", help="comma-separated subset of prefill,decode")
    args = parser.parse_args(argv)
    suites = {s.strip() for s in args.suites.split(",") if s.strip()}
    if not suites or not suites <= {"prefill", "decode"}:
        parser.error(f"--suites takes prefill and/or decode, got {args.suites!r}")

    start = time.time()
    device = default_device()
    facts = device_facts(device)
    dtype = "float16" if args.quick and device.type != "cuda" else "bfloat16"
    cap = args.cap if args.cap is not None else (2 if args.quick else 40)
    prefill, paged = kernels.get_family("attention_prefill"), kernels.get_family("attention_paged")
    points = [("prefill", prefill, s, PREFILL_BASELINES) for s in (QUICK_PREFILL if args.quick else PREFILL)]
    points += [("decode", paged, s, DECODE_BASELINES) for s in (QUICK_DECODE if args.quick else DECODE)]
    points = [p for p in points if p[0] in suites]
    seeded = device.type == "cuda" and not args.quick
    plan = [(kind, fam, s, base, candidates(fam, s, dtype, cap, known_config(fam, s, dtype) if seeded else None))
            for kind, fam, s, base in points]
    jobs = [(fam.name, compile_shape(fam, s), dtype, c) for _, fam, s, _, cfgs in plan for c in cfgs]
    workers = args.workers if device.type == "cuda" else 1
    print(f"{len(jobs)} candidates over {len(plan)} points; compiling with {workers} workers", flush=True)
    errors = iter(precompile(jobs, workers))
    failed = [{i: e for i, c in enumerate(cfgs) if (e := next(errors)) is not None} for *_, cfgs in plan]
    print(f"compiled in {time.time() - start:.0f}s, {sum(map(len, failed))} failed", flush=True)

    ceilings = measure_ceilings(device.type, dtype)
    meta: dict[str, Any] = {**run_meta(facts, ceilings.gbps), "peak_TFLOPs": ceilings.tflops}
    deadline = start + args.budget_s
    rows: list[dict] = []
    for (kind, fam, shape, base, cfgs), bad in zip(plan, failed):
        print(f"{kind} {json.dumps(shape)}", flush=True)
        rows += run_point(fam, kind, shape, dtype, cfgs, bad, meta, base, device, deadline)

    df = pd.DataFrame(rows)
    out = Path(args.out or f"results/attention_suite_{facts.key}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    cols = ["suite", "batch", "seqlen", "context_len", "head_dim", "causal", "kind", "ms", "TFLOPs", "TBps",
            "roofline_frac"] + [c for c in df.columns if c.startswith("speedup_vs_")]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(df[[c for c in cols if c in df.columns]].to_string(index=False))
    for r in df[df["state"] != "ok"].itertuples():
        print(f"{r.suite} B{r.batch} {r.kind}: {r.state}")
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}  "
          f"copy {ceilings.gbps:.0f} GB/s  matmul {ceilings.tflops:.0f} TFLOP/s")
    for line in report_targets(df):
        print(line)
    if device.type == "cuda" and not args.quick and not args.no_cache:
        path = cache.resolve_path(None)
        cache.write(path, cache_entries(df, dtype))
        print(f"merged {int((df['kind'] == 'best').sum())} winners into {path}")
    print(f"wrote {out} in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
