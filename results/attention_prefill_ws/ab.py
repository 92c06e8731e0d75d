"""Revisions of the warp-specialised prefill template timed against each other in one process.

    python -m results.attention_prefill_ws.ab --out DIR --templates T0=a.j2,T1=b.j2 [--points 0,1,2]
        [--configs '[{"variant": "wsp_pp", "BLOCK_N": 128, "num_stages": 2}, ...]'] [--rounds 2]

Each template file stands in for kernels/templates/attention_prefill_ws.py.j2 while its modules
are rendered (the template hash, hence the emitted module, differs per revision). Per point: the
float64 reference and SDPA's flash and cuDNN backends once; then, for ``--rounds`` rounds, every
config under every revision in turn, each checked on a NaN-poisoned output before it is timed
(cold-L2 CUDA-graph replays, median). Interleaving the revisions within a round keeps a drift of
the card's speed out of their ratios. Writes ``ab.csv`` and prints the median per revision and
config with its ratio to the first revision and to the baselines.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
from pathlib import Path

import pandas as pd
import torch

import kernels
from experiments.attention_suite import PREFILL, PREFILL_BASELINES, baselines_ms, checked_ms, compile_shape
from experiments.template_ab import compile_with, template_override
from kernels.attention_prefill import PrefillFamily
from experiments.suite import provenance
from kernels.device import default_device, device_facts
from results.attention_prefill_ws.bench import write

DTYPE = "bfloat16"
WS_FILE = PrefillFamily.ws_template_file
BASE = {"variant": "wsp_pp", "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "maxnreg": 0}


def _compile(text: str, job: tuple) -> str | None:
    return compile_with("attention_prefill", WS_FILE, text, job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for ab.csv")
    parser.add_argument("--templates", required=True, help="NAME=PATH,...; the first is the reference revision")
    parser.add_argument("--points", default="0,1,2,3", help="indices into attention_suite.PREFILL")
    parser.add_argument("--configs", default=json.dumps([BASE]),
                        help="JSON list of config overrides of " + json.dumps(BASE))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=14)
    args = parser.parse_args(argv)
    fam = kernels.get_family("attention_prefill")
    device = default_device()
    texts = {name: Path(path).read_text() for name, path in (t.split("=", 1) for t in args.templates.split(","))}
    configs = [{**BASE, **c} for c in json.loads(args.configs)]
    points = [PREFILL[int(i)] for i in args.points.split(",")]
    meta = provenance(device_facts(device))

    jobs = [(text, (fam.name, compile_shape(fam, shape), DTYPE, cfg))
            for shape in points for cfg in configs for text in texts.values()]
    with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        for (_, job), err in zip(jobs, pool.map(_compile, *zip(*jobs))):
            if err is not None:
                print(f"compile failed: {job[1]} {job[3]}: {err}")

    rows = []
    for shape in points:
        inputs = fam.make_inputs(shape, DTYPE, device, seed=1)
        ref = fam.reference(inputs)
        tol = fam.tolerance(DTYPE, device)
        base = {name: got[0] for name, got in baselines_ms(fam, inputs, ref, tol, PREFILL_BASELINES, "cuda").items()}
        for rnd in range(args.rounds):
            for cfg in configs:
                for name, text in texts.items():
                    with template_override(fam.name, WS_FILE, text):
                        ms, err, state = checked_ms(lambda: fam.run(inputs, cfg), fam.timed_call(inputs, cfg), inputs,
                                                    ref, tol, "cuda")
                    rows.append({**meta, **shape, "round": rnd, "revision": name, "config": json.dumps(cfg),
                                 "ms": ms, "rel_error": err, "state": state, "TFLOPs": fam.flops(shape) / ms / 1e9,
                                 **{f"{b}_ms": t for b, t in base.items()}})
        torch.cuda.empty_cache()

    df = write(rows, args.out, "ab.csv", "revision")
    keys = ["batch", "seqlen", "head_dim", "causal", "config"]
    med = df.groupby(keys + ["revision"], sort=False).agg(
        ms=("ms", "median"), TFLOPs=("TFLOPs", "median"),
        **{f"{b}_ms": (f"{b}_ms", "first") for b in PREFILL_BASELINES}).reset_index()
    first = next(iter(texts))
    ref_ms = med[med["revision"] == first].set_index(keys)["ms"]
    med["vs_" + first] = ref_ms.reindex(pd.MultiIndex.from_frame(med[keys])).to_numpy() / med["ms"]
    for b in PREFILL_BASELINES:
        med[f"vs_{b}"] = med[f"{b}_ms"] / med["ms"]
    med["config"] = med["config"].map(lambda c: "{variant} {BLOCK_N} {num_stages}st".format(**json.loads(c)))
    with pd.option_context("display.width", 250, "display.float_format", "{:.4g}".format):
        print(med.drop(columns=[f"{b}_ms" for b in PREFILL_BASELINES]).to_string(index=False))
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
