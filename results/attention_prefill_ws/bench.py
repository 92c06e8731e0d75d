"""Warp-specialised prefill (the Gluon ``ws``/``ws_pp`` variants) against the ``tma`` variant and
SDPA's flash and cuDNN backends, at issue 4's five prefill points, bfloat16, one process.

    python -m results.attention_prefill_ws.bench --out DIR [--points 0,1,...] [--variants ws,ws_pp,tma] [--block-n 128]
        [--ceilings-first]

Per point: the float64 reference once; then each baseline and each candidate runs on a
NaN-poisoned output and must match the reference before it is timed (cold-L2 CUDA-graph replays,
the autotuner's timing; median). Candidates: the family's default config, the device cache's
tuned config, and every valid config of the chosen variants. Writes ``ws_configs.csv`` (one row per
point and candidate, with device, versions and date) and prints each point's best per variant.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import torch

import kernels
from autotune import cache
from experiments.attention_suite import PREFILL, PREFILL_BASELINES, baselines_ms, checked_ms, compile_shape
from experiments.measure import measure_ceilings
from experiments.suite import precompile, provenance
from kernels.device import default_device, device_facts

DTYPE = "bfloat16"


def write(rows: list[dict], out: str, file: str, label: str) -> pd.DataFrame:
    """``rows`` as OUT/``file`` (the folder made if absent); prints the rows that failed, by ``label``."""
    df = pd.DataFrame(rows)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / file, index=False)
    for r in df[df["state"] != "ok"].to_dict("records"):
        print(f"B{r['batch']} L{r['seqlen']} D{r['head_dim']} causal={r['causal']} {r[label]} {r['config']}: {r['state']}")
    return df


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for ws_configs.csv")
    parser.add_argument("--points", default="0,1,2,3,4", help="indices into attention_suite.PREFILL")
    parser.add_argument("--variants", default="ws,ws_pp", help="variants whose every config runs")
    parser.add_argument("--block-n", type=int, help="only this BLOCK_N of those variants")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--ceilings-first", action="store_true",
                        help="measure the matmul and copy ceilings first, as attention_suite does")
    args = parser.parse_args(argv)
    fam = kernels.get_family("attention_prefill")
    device = default_device()
    variants = set(args.variants.split(","))
    meta = provenance(device_facts(device))

    plan = []
    for i in map(int, args.points.split(",")):
        shape = PREFILL[i]
        cands = [("default", fam.default_config(shape, DTYPE))]
        hit = cache.lookup(fam, shape, DTYPE, nearest=False)
        if hit is not None:
            cands.append(("cached", hit["config"]))
        cands += [(c["variant"], c) for c in fam.configs(shape, DTYPE)
                  if c["variant"] in variants and args.block_n in (None, c["BLOCK_N"])]
        plan.append((shape, cands))
    jobs = [(fam.name, compile_shape(fam, s), DTYPE, c) for s, cands in plan for _, c in cands]
    errors = iter(precompile(jobs, args.workers))
    if args.ceilings_first:
        measure_ceilings("cuda", DTYPE)

    rows = []
    for shape, cands in plan:
        inputs = fam.make_inputs(shape, DTYPE, device, seed=1)
        ref = fam.reference(inputs)
        tol = fam.tolerance(DTYPE, device)
        # (kind, config, ms, rel error, state) of the point
        timed = [(name, "", *got) for name, got in baselines_ms(fam, inputs, ref, tol, PREFILL_BASELINES,
                                                                  "cuda").items()]
        for kind, cfg in cands:
            failed = next(errors)
            if failed is not None:
                timed.append((kind, json.dumps(cfg), math.nan, math.nan, f"compile failed: {failed}"))
                continue
            timed.append((kind, json.dumps(cfg),
                          *checked_ms(lambda: fam.run(inputs, cfg), fam.timed_call(inputs, cfg), inputs, ref, tol,
                                      "cuda")))
        base = {kind: ms for kind, _, ms, _, _ in timed if kind in PREFILL_BASELINES}
        for kind, config, ms, err, state in timed:
            rows.append({**meta, **shape, "kind": kind, "config": config, "ms": ms, "rel_error": err, "state": state,
                         "TFLOPs": fam.flops(shape) / ms / 1e9,
                         **{f"speedup_vs_{name}": b / ms for name, b in base.items()}})
        torch.cuda.empty_cache()

    df = write(rows, args.out, "ws_configs.csv", "kind")
    ok = df[df["state"] == "ok"]
    best = ok.loc[ok.groupby(["batch", "seqlen", "head_dim", "causal", "kind"])["ms"].idxmin()]
    cols = ["batch", "seqlen", "head_dim", "causal", "kind", "ms", "TFLOPs", "speedup_vs_sdpa_flash",
            "speedup_vs_sdpa_cudnn", "config"]
    with pd.option_context("display.width", 250, "display.max_colwidth", 120, "display.float_format", "{:.4g}".format):
        print(best[cols].to_string(index=False))
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
