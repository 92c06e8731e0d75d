"""Where the start of a decode window goes (NOTES.md): the host time of the batch-1 step graph's
``replay()`` and of the window's input copies, and the wall time from the call to the graph's end,
for llama-3.2-1b (random init, bfloat16) with programmatic dependent launch on (the default).
Writes OUT/launch_cost.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/pdl/launch_cost.py OUT
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from engine import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
import batch1  # noqa: E402


def main(out: str) -> None:
    llm = batch1.engine()
    llm.generate([[5] * 100], [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)], use_tqdm=False)
    g = llm.runner.graphs
    graph, _ = g._graphs[1]
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    for name, fn in (("replay", graph.replay),
                     ("five input copies", lambda: [d[:1].copy_(h[:1], non_blocking=True)
                                                    for d, h in zip(g._device_buffers, g._host_sets[0])])):
        host, total = [], []
        for _ in range(30):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host.append((t1 - t0) * 1e6)
            total.append((time.perf_counter() - t0) * 1e6)
        res[name] = {"host_us_median": statistics.median(host), "call_to_done_us_median": statistics.median(total),
                     "host_us": host}
        print(name, res[name]["host_us_median"], res[name]["call_to_done_us_median"], flush=True)
    json.dump(res, open(f"{out}/launch_cost.json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
