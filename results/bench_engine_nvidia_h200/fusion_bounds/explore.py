"""Upper bounds of two batch-1 decode changes, before building them (NOTES.md): the served step
with (a) the greedy pick and advance captured into the step's graph (one graph per step of the
window, each writing its own row of a static token buffer), and (b) no rope kernel at all (the
rope_store operator made a no-op: the tokens are wrong, the time is what a fusion of rope into the
attention kernel could save at most), alone and together, interleaved in one process. Writes
OUT/bounds.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/fusion_bounds/explore.py OUT
"""
import json
import os
import sys
from pathlib import Path

import torch

from engine import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "async"))
import batch1  # noqa: E402
from ab import served  # noqa: E402

from engine.cuda_graphs import Window  # noqa: E402


class GreedyGraphs:
    """Batch-1 window steps as graphs that include the greedy pick and advance (variant a)."""

    def __init__(self, graphs, steps: int = 8) -> None:
        self.g, self.steps = graphs, steps
        self.orig = graphs.launch_window
        self.capture()

    def capture(self) -> None:
        g = self.g
        self.tokens = torch.zeros(self.steps, 1, dtype=torch.int64, device=g.ids.device)
        pool = torch.cuda.graph_pool_handle()
        self.graphs = []
        with torch.inference_mode():
            for j in range(self.steps):
                g._advance(g._forward(1), 1, self.tokens[j])  # padding rows only: advances nothing
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    g._advance(g._forward(1), 1, self.tokens[j])
                self.graphs.append(graph)
        torch.cuda.synchronize()

    def launch_window(self, seqs, steps, ahead=0):
        g = self.g
        if g.bucket(len(seqs)) != 1 or steps > self.steps:
            return self.orig(seqs, steps, ahead)
        g._fill(seqs, 1, ahead)
        for j in range(steps):
            self.graphs[j].replay()
        host = torch.empty(steps, 1, dtype=torch.int64, pin_memory=True)
        host.copy_(self.tokens[:steps], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Window(host, ready)


def main(out: str) -> None:
    res: dict = {**batch1.environment(), "rounds": []}
    llm = batch1.engine()
    res["floor_ms"] = batch1.floor_ms(llm, res["copy_GBps"])
    g = llm.runner.graphs
    ops = llm.runner.model.ops
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    served(llm, prompt, params)

    variants = {}
    variants["base"] = (g._graphs.copy(), GreedyGraphs(g))
    rope = ops.rope_store
    ops.rope_store = lambda *a, **k: None
    g._graphs = {}
    g._capture()
    variants["norope"] = (g._graphs.copy(), GreedyGraphs(g))
    ops.rope_store = rope
    orig = g.launch_window
    for name, (graphs, _) in variants.items():
        g._graphs = graphs
        span = batch1.graph_span(llm)
        res[f"span_{name}"] = span[["kernel", "calls", "busy_us", "gap_us"]].to_dict("records")
        print(name, float(span.busy_us.iloc[-1]), flush=True)
    for rnd in range(3):
        for name, (graphs, greedy) in variants.items():
            for in_graph in (False, True):
                g._graphs = graphs
                g.launch_window = greedy.launch_window if in_graph else orig
                runs = [served(llm, prompt, params) for _ in range(3)]
                row = {"round": rnd, "variant": name, "advance_in_graph": in_graph,
                       "wall_ms_per_step": [r[0] for r in runs], "median_window_ms_per_step": [r[1] for r in runs],
                       "tokens_head": runs[0][2][:16], "same_tokens": all(r[2] == runs[0][2] for r in runs)}
                res["rounds"].append(row)
                print({k: v for k, v in row.items() if k != "tokens_head"}, flush=True)
                json.dump(res, open(os.path.join(out, "bounds.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
