"""The tuned paged decode against SDPA with the L2 flushed by writes (dirty lines) and by reads (clean).

    python -m results.attention_paged_decode.flush --out DIR [--points 0,1,2,3,4] [--rounds 3]

The suite times each launch after zeroing a buffer four times L2's size (``autotune.timing.gpu_time``,
as ``triton.testing.do_bench`` flushes): L2 then holds dirty lines, and the launch's misses write
them back to DRAM while it reads. Reading the buffer instead leaves clean lines. Per point: the
device cache's config for it (else the family default) and SDPA with PyTorch's backend choice,
each checked on a NaN-poisoned output, then timed under both flushes, interleaved, ``--rounds``
times. Writes ``flush.csv`` (device, versions, date in every row) and prints the medians.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import kernels
from autotune import cache
from autotune.timing import gpu_time
from experiments.attention_suite import DECODE, checked
from kernels.device import default_device
from results.attention_prefill_ws.bench import run_facts

DTYPE = "bfloat16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for flush.csv")
    parser.add_argument("--points", default="0,1,2,3,4", help="indices into attention_suite.DECODE")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    fam = kernels.get_family("attention_paged")
    device = default_device()
    meta = run_facts(device)
    rows = []
    for shape in (DECODE[int(i)] for i in args.points.split(",")):
        hit = cache.lookup(fam, shape, DTYPE, nearest=False)
        cfg = hit["config"] if hit else fam.default_config(shape, DTYPE)
        inputs = fam.make_inputs(shape, DTYPE, device, seed=1)
        ref = fam.reference(inputs)
        tol = fam.tolerance(DTYPE, device)
        runs = {"tuned": (lambda: fam.run(inputs, cfg), fam.timed_call(inputs, cfg)),
                "sdpa": (lambda: fam.baseline(inputs), lambda: fam.baseline(inputs))}
        states = {kind: checked(check, inputs, ref, tol)[1] for kind, (check, _) in runs.items()}
        for rnd in range(args.rounds):
            for kind, (_, timed) in runs.items():
                for flush_by in ("write", "read"):
                    ms = gpu_time(timed, flush_by=flush_by)[0] if states[kind] == "ok" else float("nan")
                    rows.append({**meta, **shape, "round": rnd, "kind": kind, "flush_by": flush_by, "ms": ms,
                                 "state": states[kind], "config": json.dumps(cfg) if kind == "tuned" else ""})
    df = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(args.out) / "flush.csv", index=False)
    med = df.pivot_table(index=["batch", "context_len", "flush_by"], columns="kind", values="ms", aggfunc="median")
    med["tuned_vs_sdpa"] = med["sdpa"] / med["tuned"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(med.reset_index().to_string(index=False))
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
