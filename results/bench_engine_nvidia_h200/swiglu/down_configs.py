"""The batch-1 decode graph with the down projection's GEMV at two configs, in one process
(NOTES.md): llama-3.2-1b (random init, bfloat16, CUDA graphs, windows of 8, asynchronous
scheduling), the engine built once per best-config cache: the device's cache as committed (the
1-column tile re-tuned by results/cache_tuning/tune_down_m1.py), and a copy whose down-projection
entry holds the 8-column, 8-warp tile tuned before it. Per variant: the decode graph's span at
context 512 with each kernel's own time, and the served time per step (3 runs, as async/ab.py).
Writes OUT/down_configs.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/swiglu/down_configs.py OUT
It runs on commit 809b056 only: the SwiGLU epilogue (norm_gemv's swiglu) and the engine's use of it were
reverted after these measurements.
"""
import gc
import json
import os
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf

from autotune import cache
from engine import LLM, SamplingParams
from engine.profile import graph_timeline, timeline_summary
from experiments.bench_engine import ensure_checkpoint
from experiments.suite import copy_bandwidth_gbps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "async"))
from ab import served  # noqa: E402  (the asynchronous-scheduling A/B's served timing)

DOWN = {"M": 1, "N": 2048, "K": 8192, "b_transposed": True}
EIGHT_COLUMNS = {"variant": "gemv", "BLOCK_M": 16, "BLOCK_N": 8, "BLOCK_K": 512, "GROUP_M": 1, "SPLIT_K": 1,
                 "num_warps": 8, "num_stages": 5}


def main(out: str) -> None:
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
                 "copy_GBps": copy_bandwidth_gbps(), "variants": []}
    model = OmegaConf.load("conf/model/llama-3.2-1b.yaml")
    path = ensure_checkpoint(OmegaConf.create({"checkpoint_dir": None, "checkpoint_root": "results/runs/checkpoints"}),
                             model, "bfloat16")
    committed = "results/cache/nvidia_h200.json"
    data = json.load(open(committed))
    key = cache.entry_key("gemm", "bfloat16", DOWN)
    data["entries"][key] = {**data["entries"][key], "config": EIGHT_COLUMNS}
    eight = os.path.join(tempfile.mkdtemp(), "cache.json")
    json.dump(data, open(eight, "w"))
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    for label, path_cache in (("one_column", committed), ("eight_columns", eight)):
        llm = LLM(path, dtype="bfloat16", max_num_seqs=8, max_model_len=1024, num_decode_steps=8,
                  gpu_memory_utilization=0.3, config_cache=path_cache)
        floor = llm.runner.model.weights.decode_bytes() / (res["copy_GBps"] * 1e6)
        served(llm, prompt, params)
        ids, positions, meta = llm.runner.dummy_inputs(1, 1, 512)
        span = timeline_summary(graph_timeline(llm.runner.graphs.load(ids, positions, meta), replays=10))
        runs = [served(llm, prompt, params) for _ in range(3)]
        row = {"label": label, "floor_ms": floor, "graph_span_us": float(span.busy_us.iloc[-1]),
               "kernels": span[["kernel", "calls", "busy_us"]].to_dict("records"),
               "wall_ms_per_step": [r[0] for r in runs], "median_window_ms_per_step": [r[1] for r in runs]}
        res["variants"].append(row)
        print({k: v for k, v in row.items() if k != "kernels"}, [(k["kernel"][:12], round(k["busy_us"], 1)) for k in row["kernels"]], flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    json.dump(res, open(os.path.join(out, "down_configs.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
