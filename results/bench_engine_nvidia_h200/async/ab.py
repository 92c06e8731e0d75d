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
from pathlib import Path

import torch

from engine import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
import batch1  # noqa: E402


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
    res: dict = {**batch1.environment(), "rounds": []}
    llm = batch1.engine()
    res["floor_ms"] = batch1.floor_ms(llm, res["copy_GBps"])
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    served(llm, prompt, params)  # first calls
    span = batch1.graph_span(llm)
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
