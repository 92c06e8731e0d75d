"""GEMM suite: the family's default config and the best of a capped brute-force pass, against cuBLAS.

    python -m experiments.gemm_suite                     # the GPU suite, bfloat16 and float16
    python -m experiments.gemm_suite --quick             # tiny shapes, runs on the CPU interpreter

Suite: M in {1, 16, 64, 256, 1024, 4096} x (N, K) in {(4096, 4096), (6144, 4096), (28672, 4096),
(4096, 14336)}, plus 4096^3 and 8192^3; B is a transposed weight view (a linear layer). For each
shape and dtype: correctness of every candidate against the float64 reference first (a wrong
candidate is dropped), then ``triton.testing.do_bench`` medians (L2 flushed) of cuBLAS
(``torch.matmul``), the default config and each sampled config. Candidates are compiled ahead in a
pool of processes so that the timing loop hits Triton's disk cache. Writes one CSV (a row per
(shape, dtype, kind)) with device, versions and date, and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch

import kernels
from experiments.suite import bench, candidates, copy_bandwidth_gbps, precompile, run_meta
from kernels.device import default_device, device_facts
from kernels.family import rel_error

NK = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]
SUITE = [{"M": m, "N": n, "K": k} for m in (1, 16, 64, 256, 1024, 4096) for n, k in NK] + [
    {"M": 4096, "N": 4096, "K": 4096},
    {"M": 8192, "N": 8192, "K": 8192},
]
QUICK = [{"M": 1, "N": 64, "K": 96}, {"M": 40, "N": 96, "K": 128}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.gemm_suite", description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--cap", type=int, default=32, help="sampled configs per shape and dtype")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop sampling new shapes after this")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter)")
    parser.add_argument("--out", help="CSV path (default results/gemm_suite_<device>.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", help="MxNxK,... instead of the suite")
    parser.add_argument("--configs", help="JSON list of configs to time (with the default) instead of sampling")
    parser.add_argument("--b-row-major", action="store_true", help="B as a row-major [K, N] matrix, not a weight view")
    parser.add_argument("--every-config", action="store_true",
                        help="also write a row (kind 'config') for every candidate timed, not only the best")
    args = parser.parse_args(argv)

    start = time.time()
    fam = kernels.get_family("gemm")
    device = default_device()
    facts = device_facts(device)
    shapes = QUICK if args.quick else SUITE
    if args.shapes:
        shapes = [dict(zip("MNK", map(int, s.split("x")))) for s in args.shapes.split(",")]
    if args.b_row_major:
        shapes = [{**s, "b_transposed": False} for s in shapes]
    dtypes = args.dtypes.split(",")
    if args.quick:
        dtypes = [d for d in dtypes if d != "bfloat16" or torch.cuda.is_available()] or ["float16"]
    if args.configs:
        fixed = json.loads(args.configs)
        plan = [(s, d, [fam.default_config(s, d)] + [c for c in fixed if fam.reject(s, d, c) is None])
                for d in dtypes for s in shapes]
    else:
        plan = [(s, d, candidates(fam, s, d, args.cap, args.seed)) for d in dtypes for s in shapes]
    jobs = [("gemm", s, d, c) for s, d, cfgs in plan for c in cfgs]
    print(f"{len(jobs)} candidates over {len(plan)} (shape, dtype) points; compiling with {args.workers} workers")
    errors = precompile(jobs, args.workers if torch.cuda.is_available() else 1)
    failed = {(json.dumps(j[1]), j[2], json.dumps(j[3], sort_keys=True)): e for j, e in zip(jobs, errors) if e}
    print(f"compiled in {time.time() - start:.0f}s, {len(failed)} failed")
    for err in sorted(set(failed.values()))[:3]:
        print("  e.g.", err)
    copy_gbps = copy_bandwidth_gbps()

    meta = run_meta(facts, copy_gbps)
    rows = []
    for shape, dtype, cfgs in plan:
        inputs = fam.make_inputs(shape, dtype, device, seed=1)
        ref = fam.reference(inputs)
        tol = fam.tolerance(dtype, device)
        flops, nbytes = fam.flops(shape), fam.bytes(shape, dtype)

        def row(kind: str, cfg: dict | None, t: tuple[float, float, float], tried: int = 1, bad: int = 0) -> dict:
            ms = t[0]
            return {**meta, "dtype": dtype, **{k: shape[k] for k in "MNK"}, "kind": kind, "config": json.dumps(cfg) if cfg else "",
                    "ms": ms, "ms_p20": t[1], "ms_p80": t[2], "TFLOPs": flops / ms / 1e9,
                    "GBps": nbytes / ms / 1e6, "roofline_frac": (nbytes / ms / 1e6) / copy_gbps
                    if math.isfinite(copy_gbps) else float("nan"), "tried": tried, "failed": bad}

        cublas = bench(lambda: torch.matmul(inputs["a"], inputs["b"]), args.quick)
        rows.append(row("cublas", None, cublas))
        timed: list[tuple[tuple[float, float, float], dict]] = []
        bad = 0
        out_of_time = time.time() - start > args.budget_s
        for i, cfg in enumerate(cfgs):
            if out_of_time and i > 0:
                break  # keep the default; skip sampling when the device call's time is running out
            if (json.dumps(shape), dtype, json.dumps(cfg, sort_keys=True)) in failed:
                bad += 1
                continue
            inputs["out"].fill_(float("nan"))
            try:
                fam.run(inputs, cfg)
                err = rel_error(inputs["out"], ref)
            except Exception:  # runtime failure of one candidate
                err = math.inf
            if not err <= tol:
                bad += 1
                continue
            timed.append((bench(lambda: fam.run(inputs, cfg), args.quick), cfg))
        if args.every_config:
            rows += [row("config", cfg, t) for t, cfg in timed]
        default_cfg = cfgs[0]
        default_t = next((t for t, c in timed if c == default_cfg), None)
        if default_t is not None:
            rows.append(row("default", default_cfg, default_t))
        if timed:
            best_t, best_cfg = min(timed, key=lambda tc: tc[0][0])
            rows.append(row("best", best_cfg, best_t, tried=len(timed) + bad, bad=bad))
            print(f"{dtype:9s} {shape['M']:5d}x{shape['N']:5d}x{shape['K']:5d}  cublas {cublas[0]:.4f} ms  "
                  f"default {default_t[0] if default_t else float('nan'):.4f}  best {best_t[0]:.4f} "
                  f"({best_cfg['variant']})  ratio {cublas[0] / best_t[0]:.3f}  [{len(timed)} ok, {bad} bad]",
                  flush=True)

    df = pd.DataFrame(rows)
    if "best" not in set(df["kind"]):
        raise SystemExit("no candidate ran correctly on any shape; see the errors above")
    piv = df.pivot_table(index=["dtype", "M", "N", "K"], columns="kind", values="ms").reset_index()
    piv["best_vs_cublas"] = piv["cublas"] / piv["best"]
    piv["default_vs_cublas"] = piv["cublas"] / piv["default"]
    ratio_col = df.merge(piv[["dtype", "M", "N", "K", "best_vs_cublas", "default_vs_cublas"]], on=["dtype", "M", "N", "K"])
    out = Path(args.out or f"results/gemm_suite_{facts.key}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    ratio_col.to_csv(out, index=False)
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}  copy {copy_gbps:.0f} GB/s")
    for dtype, g in piv.groupby("dtype"):
        geo = math.exp(g["best_vs_cublas"].apply(math.log).mean())
        geo_def = math.exp(g["default_vs_cublas"].dropna().apply(math.log).mean())
        worst = g.loc[g["best_vs_cublas"].idxmin()]
        print(f"{dtype}: best-of-space vs cuBLAS geomean {geo:.3f} (default {geo_def:.3f}); worst "
              f"{int(worst.M)}x{int(worst.N)}x{int(worst.K)} at {worst.best_vs_cublas:.3f}")
    print(f"wrote {out} in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
