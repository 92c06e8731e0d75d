"""Rope and the KV store fused into decode attention, on and off in one process (NOTES.md): the
batch-1 decode of llama-3.2-1b (random init, bfloat16, CUDA graphs, windows of 8 steps).

1. Fused (TritonOps.rope_attention: one attention_paged launch a layer) and unfused (the rope
   kernel with its KV store, then attention), each with its graphs captured: the decode graph's
   span at context 512 with each kernel's own time, then 3 rounds of (fused, unfused), 3 runs each,
   of a 128-token prompt generating 129 tokens (served ms per step, as async/ab.py counts it) and
   the greedy tokens, which must be the same.
2. Fused, with the attention config forced to each of CONFIGS: the graph's span at contexts 256
   and 512 and the served step.
Writes OUT/rope_attention_ab.json (part 1) or OUT/rope_attention_configs.json (part 2), with the
config the graph resolves.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/rope_attention/ab.py OUT [ab|configs]
"""
import functools
import json
import os
import sys
from pathlib import Path

import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
import batch1  # noqa: E402
from batch1 import recapture, served  # noqa: E402

CONFIGS = [  # valid at the graph's context bound, 1024 (batch1.engine's max_model_len)
    {"variant": "decode_split", "TILE": 64, "SPLIT": 4, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 3},
    {"variant": "decode_split", "TILE": 64, "SPLIT": 16, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 3},
    {"variant": "decode_split", "TILE": 32, "SPLIT": 32, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 2},
    {"variant": "decode_split", "TILE": 32, "SPLIT": 16, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 2},
    {"variant": "decode_split", "TILE": 16, "SPLIT": 64, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 2},
    {"variant": "decode_split", "TILE": 128, "SPLIT": 8, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 4},
    {"variant": "decode_split", "TILE": 32, "SPLIT": 32, "HEADS": 2, "BLOCK_Q": 1, "num_warps": 2, "num_stages": 2},
    {"variant": "decode_split", "TILE": 64, "SPLIT": 16, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 2, "num_stages": 3},
]


def main(out: str, part: str) -> None:
    res: dict = {**batch1.environment(), "rounds": [], "configs": []}
    llm = batch1.engine()
    res["floor_ms"] = batch1.floor_ms(llm, res["copy_GBps"])
    ops = llm.runner.model.ops
    prompt, params = batch1.request()
    dump = lambda: json.dump(res, open(os.path.join(out, f"rope_attention_{part}.json"), "w"), indent=1)  # noqa: E731
    served(llm, prompt, params)
    c = llm.config  # the batch-1 graph's attention shape
    res["graph_attention_config"] = ops.resolve("attention_paged", {
        "batch": 1, "query_len": 1, "context_len": llm.max_model_len, "heads_q": c.num_heads,
        "heads_kv": c.num_kv_heads, "head_dim": c.head_dim, "block_size": llm.runner.block_size, "rope": True},
        "bfloat16")
    print("graph attention config", res["graph_attention_config"], flush=True)
    if part == "configs":
        return configs(llm, ops, prompt, params, res, dump, served(llm, prompt, params)[2])
    graphs = {"fused": llm.runner.graphs._graphs}
    fused = ops.fuses_rope_attention
    ops.fuses_rope_attention = lambda max_seqlen_q: False
    recapture(llm)
    graphs["unfused"] = llm.runner.graphs._graphs
    served(llm, prompt, params)
    variants = {"fused": fused, "unfused": ops.fuses_rope_attention}
    for name in variants:
        ops.fuses_rope_attention = variants[name]
        llm.runner.graphs._graphs = graphs[name]
        span = batch1.graph_span(llm)
        res[f"span_{name}"] = batch1.kernel_records(span)
        print(name, float(span.busy_us.iloc[-1]), flush=True)
    for rnd in range(3):
        for name in variants:
            ops.fuses_rope_attention = variants[name]
            llm.runner.graphs._graphs = graphs[name]
            row = {"round": rnd, "variant": name, **batch1.timed_runs(llm, prompt, params)}
            res["rounds"].append(row)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
            dump()
    res["same_tokens_fused_unfused"] = all(r["tokens"] == res["rounds"][0]["tokens"] for r in res["rounds"])
    print("same tokens fused/unfused:", res["same_tokens_fused_unfused"], flush=True)


def configs(llm, ops, prompt, params, res, dump, tokens) -> None:
    family = kernels.get_family("attention_paged")
    tuned = ops._launchers["attention_paged"]
    for cfg in CONFIGS:
        forced = functools.partial(family.call, config=cfg)
        ops._launchers["attention_paged"] = lambda *a, _f=forced, **k: (_f if a[6] == 1 else tuned)(*a, **k)
        ops._fn = ops._launchers
        recapture(llm)
        row = {"config": cfg}
        for ctx in (256, 512):
            span = batch1.graph_span(llm, context=ctx)
            row[f"span_us_{ctx}"] = float(span.busy_us.iloc[-1])
            row[f"paged_us_{ctx}"] = float(span.set_index("kernel").busy_us.get("paged_kernel", float("nan")))
            row[f"merge_us_{ctx}"] = float(span.set_index("kernel").busy_us.get("merge_kernel", 0.0))
        timed = batch1.timed_runs(llm, prompt, params)
        row["median_window_ms_per_step"] = timed["median_window_ms_per_step"]
        row["same_tokens"] = timed["tokens"] == tokens
        res["configs"].append(row)
        print(row, flush=True)
        dump()
    ops._launchers["attention_paged"] = tuned


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ab")
