"""Tune the GEMM suite on this machine's GPU, fill its best-config cache and compare with cuBLAS.

    python -m autotune.tune_suite                  # GPU: the suite below in bfloat16, ~40 trials a shape
    python -m autotune.tune_suite --quick          # CPU interpreter: two tiny shapes, a few trials,
                                                   # everything under results/runs/tune_suite_quick/

Suite (issue 2): M in {1, 16, 64, 256, 1024, 4096} x (N, K) in {(4096, 4096), (6144, 4096),
(28672, 4096), (4096, 14336)}, plus 4096^3 and 8192^3, with B a transposed weight view (how the
engine's linear layers call the GEMM, so dispatch finds these entries exactly). Shapes of one (N, K)
are tuned in increasing M, so each warm-starts from the winners of its smaller neighbours.

Each shape is an :func:`autotune.tune` call (studies in ``results/optuna.db``: an interrupted run
resumes where it stopped; a finished one re-measures nothing). The tuned median and the cuBLAS
(``torch.matmul``) median come from the same worker process, timed interleaved during the
confirmation. Writes ``results/tune_suite_<device>.csv`` (a row per shape) and
``results/tune_suite_<device>_summary.csv`` (geometric mean of cuBLAS/tuned, worst shape), both
with device, versions and date, and the winners into ``results/cache/<device>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from pathlib import Path

import pandas as pd

import autotune
from autotune.paths import results_dir
from autotune.tuner import _version
from kernels.device import default_device, device_facts

NK = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]
GEMM_SUITE = [{"M": m, "N": n, "K": k, "b_transposed": True} for n, k in NK for m in (1, 16, 64, 256, 1024, 4096)] + [
    {"M": 4096, "N": 4096, "K": 4096, "b_transposed": True},
    {"M": 8192, "N": 8192, "K": 8192, "b_transposed": True},
]
QUICK_SUITE = [{"M": 1, "N": 64, "K": 96, "b_transposed": True}, {"M": 16, "N": 48, "K": 64, "b_transposed": True}]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two tiny shapes in float16 (runs on the CPU)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on a GPU), float16 or float32")
    parser.add_argument("--trials", type=int, default=None, help="evaluated trials per shape (default 40; 4 with --quick)")
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "gp", "random", "exhaustive"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one candidate may take")
    parser.add_argument("--compile-workers", type=int, default=None, help="compile helper processes (GPU)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL or .db path (default results/optuna.db)")
    parser.add_argument("--cache", default=None, help="cache file (default results/cache/<device>.json)")
    parser.add_argument("--out", default=None, help="CSV to write (default results/tune_suite_<device>.csv)")
    parser.add_argument("--time-limit-min", type=float, default=9.0,
                        help="start no new shape after this many minutes (rerun to resume the rest)")
    args = parser.parse_args(argv)

    facts = device_facts()
    on_gpu = default_device().type == "cuda"
    if not on_gpu and not args.quick:
        parser.error("no GPU here: the suite needs one (use --quick for a CPU run of two tiny shapes)")
    shapes = QUICK_SUITE if args.quick else GEMM_SUITE
    dtype = args.dtype or ("float16" if args.quick else "bfloat16")
    trials = args.trials or (4 if args.quick else 40)
    # A quick run keeps everything in the git-ignored results/runs/, away from the shipped caches.
    folder = results_dir() / "runs" / "tune_suite_quick" if args.quick else results_dir()
    out = Path(args.out) if args.out else folder / f"tune_suite_{facts.key}.csv"
    cache_path = args.cache or (folder / "cache.json" if args.quick else None)
    storage = args.storage or (folder / "optuna.db" if args.quick else None)
    folder.mkdir(parents=True, exist_ok=True)

    start, rows = time.perf_counter(), []
    for shape in shapes:
        if time.perf_counter() - start > args.time_limit_min * 60:
            print(f"time limit reached: {len(shapes) - len(rows)} shapes left; rerun the same command to resume")
            break
        t0 = time.perf_counter()
        res = autotune.tune("gemm", shape, dtype, n_trials=trials, sampler=args.sampler, seed=args.seed,
                            cache_path=cache_path, storage=storage, timeout_s=args.timeout,
                            compile_workers=args.compile_workers, progress=True)
        flops = 2.0 * shape["M"] * shape["N"] * shape["K"]
        rows.append({
            "M": shape["M"], "N": shape["N"], "K": shape["K"], "dtype": dtype,
            "tuned_ms": res.ms, "tuned_ms_p20": res.ms_p20, "tuned_ms_p80": res.ms_p80,
            "cublas_ms": res.baseline_ms, "speedup_vs_cublas": res.speedup,
            "tuned_tflops": flops / res.ms / 1e9, "cublas_tflops": flops / res.baseline_ms / 1e9 if res.baseline_ms else None,
            "variant": res.config.get("variant"), "config": json.dumps(res.config, sort_keys=True),
            "trials": res.n_trials, "new_trials": res.new_trials, "failed_trials": res.failed_trials,
            "tune_s": time.perf_counter() - t0, "sampler": args.sampler,
        })
        r = rows[-1]
        print(f"{shape['M']:>5} x {shape['N']:>5} x {shape['K']:>5}: tuned {res.ms:.4f} ms, cuBLAS "
              f"{res.baseline_ms or float('nan'):.4f} ms, x{res.speedup or float('nan'):.3f}, {r['variant']}, "
              f"{res.new_trials} new trials in {r['tune_s']:.1f} s", flush=True)

    stamp = {"device": facts.name, "capability": ".".join(map(str, facts.capability)), "torch": _version("torch"),
             "triton": _version("triton"), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    table = pd.DataFrame(rows).assign(**stamp)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    ratios = table["speedup_vs_cublas"].dropna()
    summary = {"shapes": len(table), "total_shapes": len(shapes), "total_min": (time.perf_counter() - start) / 60}
    if len(ratios):
        worst = table.loc[ratios.idxmin()]
        summary.update(
            geomean_speedup_vs_cublas=math.exp(sum(math.log(x) for x in ratios) / len(ratios)),
            worst_shape=f"{worst.M}x{worst.N}x{worst.K}", worst_speedup=float(worst.speedup_vs_cublas),
            shapes_below_0_9=int((ratios < 0.9).sum()),
        )
    pd.DataFrame([{**summary, "dtype": dtype, "sampler": args.sampler, "trials_per_shape": trials, **stamp}]).to_csv(
        out.with_name(out.stem + "_summary.csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["M", "N", "K", "tuned_ms", "cublas_ms", "speedup_vs_cublas", "tuned_tflops", "variant", "new_trials", "tune_s"]])
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_name(out.stem + '_summary.csv')}")
    return table


if __name__ == "__main__":
    main()
