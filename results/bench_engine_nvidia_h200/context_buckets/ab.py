"""Decode graphs per context bucket (engine/cuda_graphs.py), on the GPU (NOTES.md).

Part ``tune``: autotune.tune on the decode attention shapes that the graphs of the shorter context
buckets launch (llama-3.2-1b: Hq 32, Hkv 8, D 64, block 16, the rope shape), at batch 1, 8, 32, 128
and 256 and contexts 256, 512 and 1024; the bucket of max_model_len (2048) was tuned before. The
winners go into the device's best-config cache (results/cache/), which is copied to OUT with a table
of them, tuned_attention.csv.

Part ``ab``: the batch-1 decode of benchmark's engine (max_model_len 2048, windows of 8 steps) with
a graph per context bucket against one graph over every context (the engine before), in one
process: the graph's span at contexts 256 and 512 (each kernel's own time), then 3 rounds of both,
3 runs each, of a 128-token prompt generating 129 tokens (served ms per step) and the greedy tokens.
Writes OUT/context_buckets_ab.json with the attention config each bucket resolves.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/context_buckets/ab.py OUT [tune|ab]
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

import autotune
from autotune.cache import resolve_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
import batch1  # noqa: E402

MAX_MODEL_LEN = 2048
BATCHES = (1, 8, 32, 128, 256)
CONTEXTS = (256, 512, 1024)


def shape(batch: int, context: int) -> dict:
    return {"batch": batch, "query_len": 1, "heads_q": 32, "heads_kv": 8, "head_dim": 64, "block_size": 16,
            "context_len": context, "rope": True}


def tune(out: str) -> None:
    rows = []
    for b in BATCHES:
        for ctx in CONTEXTS:
            res = autotune.tune("attention_paged", shape(b, ctx), "bfloat16", n_trials=12, timeout_s=30.0)
            rows.append({"batch": b, "context_len": ctx, "ms": res.ms, "baseline_ms": res.baseline_ms,
                         "trials": res.n_trials, "config": json.dumps(res.config, sort_keys=True)})
            print(rows[-1], flush=True)
    env = batch1.environment()
    table = pd.DataFrame(rows).assign(device=env["device"], torch=env["torch"], triton=env["triton"], date=env["date"])
    table.to_csv(os.path.join(out, "tuned_attention.csv"), index=False)
    cache = resolve_path(None)
    shutil.copy(cache, os.path.join(out, cache.name))


def ab(out: str) -> None:
    res: dict = {**batch1.environment(), "rounds": []}
    llm = batch1.engine(max_model_len=MAX_MODEL_LEN)
    res["floor_ms"] = batch1.floor_ms(llm, res["copy_GBps"])
    ops, g = llm.runner.model.ops, llm.runner.graphs
    res["contexts"], res["graphs"] = g.contexts, g.num_graphs
    res["bucket_configs"] = {cap: ops.resolve("attention_paged", shape(1, cap), "bfloat16") for cap in g.contexts}
    print(res["contexts"], res["graphs"], res["bucket_configs"], flush=True)
    prompt, params = batch1.request()
    dump = lambda: json.dump(res, open(os.path.join(out, "context_buckets_ab.json"), "w"), indent=1)  # noqa: E731
    variants = {"per_bucket": list(g.contexts), "one_graph": [g.contexts[-1]]}
    graphs = {}
    for name, contexts in variants.items():
        batch1.recapture(llm, contexts)
        graphs[name] = g._graphs
        batch1.served(llm, prompt, params)
        for ctx in (256, 512):
            span = batch1.graph_span(llm, context=ctx)
            res[f"span_{name}_{ctx}"] = batch1.kernel_records(span)
            print(name, ctx, float(span.busy_us.iloc[-1]), flush=True)
    for rnd in range(3):
        for name, contexts in variants.items():
            g.contexts, g._graphs = contexts, graphs[name]
            row = {"round": rnd, "variant": name, **batch1.timed_runs(llm, prompt, params)}
            res["rounds"].append(row)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
            dump()
    res["same_tokens_within_variants"] = all(
        r["tokens"] == next(s for s in res["rounds"] if s["variant"] == r["variant"])["tokens"] for r in res["rounds"])
    print("same tokens within each variant:", res["same_tokens_within_variants"], flush=True)
    dump()


if __name__ == "__main__":
    {"tune": tune, "ab": ab}[sys.argv[2] if len(sys.argv) > 2 else "ab"](sys.argv[1])
