"""Asynchronous scheduling on and off in one process, interleaved (NOTES.md): the batch-1 decode of
llama-3.2-1b (random init, bfloat16, CUDA graphs, windows of 8 steps). For each of 3 rounds of
(on, off): the served time per decode step of a 128-token prompt generating 129 tokens, as the
decode's wall time over its 128 steps (no host sync between steps: that would stall the window
launched ahead) and as bench_engine's median window time per step (3 runs each), and the greedy
tokens. Once: the decode graph's span at context 512 and each kernel's own time in it. Writes
OUT/async_ab.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/async/ab.py OUT
"""
import json
import os
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

from engine import LLM, SamplingParams
from engine.profile import graph_timeline, timeline_summary
from experiments.bench_engine import ensure_checkpoint
from experiments.suite import copy_bandwidth_gbps


def served(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, float, list[int]]:
    """(decode wall ms / decode steps, median over windows of window ms / its steps, tokens)."""
    seq = llm.add_request(prompt, params)
    llm.step()  # the prefill samples the first token
    torch.cuda.synchronize()
    windows, steps = [], 0
    t0 = last = time.perf_counter()
    while llm.has_unfinished():
        llm.step()
        now = time.perf_counter()
        windows.append((now - last) * 1e3 / llm.last_batch.num_steps)
        steps += llm.last_batch.num_steps
        last = now
    wall = (time.perf_counter() - t0) * 1e3
    return wall / steps, statistics.median(windows), llm.output(seq).token_ids


def main(out: str) -> None:
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
                 "copy_GBps": copy_bandwidth_gbps(), "rounds": []}
    model = OmegaConf.load("conf/model/llama-3.2-1b.yaml")
    path = ensure_checkpoint(OmegaConf.create({"checkpoint_dir": None, "checkpoint_root": "results/runs/checkpoints"}),
                             model, "bfloat16")
    llm = LLM(path, dtype="bfloat16", max_num_seqs=8, max_model_len=1024, num_decode_steps=8, gpu_memory_utilization=0.3)
    res["floor_ms"] = llm.runner.model.weights.decode_bytes() / (res["copy_GBps"] * 1e6)
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    served(llm, prompt, params)  # first calls
    ids, positions, meta = llm.runner.dummy_inputs(1, 1, 512)
    span = timeline_summary(graph_timeline(llm.runner.graphs.load(ids, positions, meta), replays=10))
    res["graph_span_us"] = float(span.busy_us.iloc[-1])
    res["graph_kernels"] = span[["kernel", "calls", "busy_us", "gap_us"]].to_dict("records")
    print({"floor_ms": res["floor_ms"], "graph_span_us": res["graph_span_us"]}, flush=True)
    for rnd in range(3):
        for flag in (True, False):
            llm.async_scheduling = flag
            runs = [served(llm, prompt, params) for _ in range(3)]
            row = {"round": rnd, "async": flag, "wall_ms_per_step": [r[0] for r in runs],
                   "median_window_ms_per_step": [r[1] for r in runs], "tokens": runs[0][2],
                   "same_tokens": all(r[2] == runs[0][2] for r in runs)}
            res["rounds"].append(row)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
            json.dump(res, open(os.path.join(out, "async_ab.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
