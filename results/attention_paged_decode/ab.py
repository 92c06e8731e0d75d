"""Revisions of the paged-attention template timed against each other at issue 4's decode points.

    python -m results.attention_paged_decode.ab --out DIR --templates R0=a.j2,R1=b.j2 [--points 0,1,2,3,4]
        [--configs '[{"variant": "general", "TILE": 64, ...}, ...]'] [--rounds 2]

Each template file stands in for kernels/templates/attention_paged.py.j2 while its modules are
rendered. Per point (``attention_suite.DECODE``): the float64 reference and SDPA's backends once;
then, for ``--rounds`` rounds, every config valid at the point under every revision in turn, each
checked on a NaN-poisoned output before it is timed (cold-L2 CUDA-graph replays, median).
Interleaving the revisions within a round keeps a drift of the card's speed out of their ratios.
``--no-pdl-too`` also runs each revision without programmatic dependent launch (``WORKBENCH_PDL=0``),
as NAME-nopdl.
Writes ``ab.csv`` (device, versions, date in every row) and prints the median per point, config
and revision with its ratio to the first revision and to SDPA.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

import kernels
from experiments.attention_suite import DECODE_BASELINES, baselines_ms, checked_ms, compile_shape, decode_points
from experiments.template_ab import compile_with, template_override
from experiments.suite import provenance
from kernels.device import default_device, device_facts

FAMILY = "attention_paged"
FILE = "attention_paged.py.j2"
BASE = {"variant": "general", "TILE": 64, "SPLIT": 1, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 3}
CONFIGS = [{}, {"num_stages": 4}, {"num_warps": 2}, {"TILE": 128}, {"TILE": 128, "num_stages": 2},
           {"TILE": 32, "num_stages": 4}, {"variant": "decode"}, {"variant": "decode", "num_warps": 2},
           {"variant": "decode_split", "SPLIT": 2}, {"variant": "decode_split", "SPLIT": 8, "num_warps": 2},
           {"variant": "decode_split", "TILE": 32, "SPLIT": 64, "num_stages": 2}]


@contextlib.contextmanager
def _pdl(on: bool) -> Iterator[None]:
    """Within the block, modules render with programmatic dependent launch on (where the GPU has
    it) or off; the caller re-resolves them (``template_override`` forgets the loaded ones)."""
    saved = os.environ.get("WORKBENCH_PDL")
    os.environ["WORKBENCH_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORKBENCH_PDL")
        else:
            os.environ["WORKBENCH_PDL"] = saved


def _compile(text: str, pdl: bool, job: tuple) -> str | None:
    with _pdl(pdl):
        return compile_with(FAMILY, FILE, text, job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for ab.csv")
    parser.add_argument("--templates", required=True, help="NAME=PATH,...; the first is the reference revision")
    parser.add_argument("--points", default="0,1,2,3,4", help="indices into attention_suite.DECODE")
    parser.add_argument("--quick", action="store_true", help="attention_suite's quick decode point instead (a smoke test)")
    parser.add_argument("--configs", default=json.dumps(CONFIGS), help="JSON list of config overrides of " + json.dumps(BASE))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", help="float16 on the CPU: the interpreter's bfloat16 dot is wrong")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--no-pdl-too", action="store_true", help="each revision also without PDL, as NAME-nopdl")
    args = parser.parse_args(argv)
    fam = kernels.get_family(FAMILY)
    device = default_device()
    texts = {name: Path(path).read_text() for name, path in (t.split("=", 1) for t in args.templates.split(","))}
    revisions = {name: (text, True) for name, text in texts.items()}
    if args.no_pdl_too:
        revisions.update({f"{name}-nopdl": (text, False) for name, text in texts.items()})
    overrides = [{**BASE, **c} for c in json.loads(args.configs)]
    points = decode_points(args.points, args.quick)
    plan = []
    for shape in points:
        valid = fam.configs(shape, args.dtype)
        # HEADS: the whole GQA group in one program (the quick point's group is smaller).
        group = shape["heads_q"] // shape["heads_kv"]
        plan.append((shape, [c for c in ({**o, "HEADS": group} for o in overrides) if c in valid]))
    meta = provenance(device_facts(device))

    jobs = [(text, pdl, (fam.name, compile_shape(fam, shape), args.dtype, cfg))
            for shape, cfgs in plan for cfg in cfgs for text, pdl in revisions.values()]
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        for (*_, job), err in zip(jobs, pool.map(_compile, *zip(*jobs))):
            if err is not None:
                print(f"compile failed: {job[1]} {job[3]}: {err}")

    rows = []
    for shape, cfgs in plan:
        inputs = fam.make_inputs(shape, args.dtype, device, seed=1)
        ref = fam.reference(inputs)
        tol = fam.tolerance(args.dtype, device)
        base = {name: got[0] for name, got in baselines_ms(fam, inputs, ref, tol, DECODE_BASELINES, device.type).items()}
        for rnd in range(args.rounds):
            for cfg in cfgs:
                for name, (text, pdl) in revisions.items():
                    with _pdl(pdl), template_override(FAMILY, FILE, text):
                        ms, err, state = checked_ms(lambda: fam.run(inputs, cfg), fam.timed_call(inputs, cfg), inputs,
                                                    ref, tol, device.type)
                    rows.append({**meta, "dtype": args.dtype, **shape, "round": rnd, "revision": name,
                                 "config": json.dumps(cfg), "ms": ms, "rel_error": err, "state": state,
                                 "TBps": fam.bytes(shape, args.dtype) / ms / 1e9, **{f"{b}_ms": t for b, t in base.items()}})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    df = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(args.out) / "ab.csv", index=False)
    for r in df[df["state"] != "ok"].to_dict("records"):
        print(f"B{r['batch']} L{r['context_len']} {r['revision']} {r['config']}: {r['state']}")
    keys = ["batch", "context_len", "config"]
    med = df.groupby(keys + ["revision"], sort=False).agg(ms=("ms", "median"), TBps=("TBps", "median"),
                                                         sdpa_ms=("sdpa_ms", "first")).reset_index()
    first = next(iter(texts))
    ref_ms = med[med["revision"] == first].set_index(keys)["ms"]
    med["vs_" + first] = ref_ms.reindex(pd.MultiIndex.from_frame(med[keys])).to_numpy() / med["ms"]
    med["vs_sdpa"] = med["sdpa_ms"] / med["ms"]
    med["config"] = med["config"].map(lambda c: "{variant} T{TILE} S{SPLIT} w{num_warps} {num_stages}st".format(**json.loads(c)))
    with pd.option_context("display.width", 250, "display.max_rows", 500, "display.float_format", "{:.4g}".format):
        print(med.to_string(index=False))
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
