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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
import batch1  # noqa: E402
from batch1 import served  # noqa: E402


def main(out: str) -> None:
    res: dict = {**batch1.environment(), "rounds": []}
    llm = batch1.engine()
    res["floor_ms"] = batch1.floor_ms(llm, res["copy_GBps"])
    prompt, params = batch1.request()
    served(llm, prompt, params)  # first calls
    span = batch1.graph_span(llm)
    res["graph_span_us"] = float(span.busy_us.iloc[-1])
    res["graph_kernels"] = batch1.kernel_records(span)
    print({"floor_ms": res["floor_ms"], "graph_span_us": res["graph_span_us"]}, flush=True)
    for rnd in range(3):
        for flag in (True, False):
            llm.async_scheduling = flag
            row = {"round": rnd, "async": flag, **batch1.timed_runs(llm, prompt, params)}
            res["rounds"].append(row)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
            json.dump(res, open(os.path.join(out, "async_ab.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
