"""The programmatic-dependent-launch A/B of NOTES.md: the batch-1 decode of llama-3.2-1b (random init,
bfloat16, CUDA graphs, windows of 8 steps), run once per process with PDL on or off
(``WORKBENCH_PDL=0``): the decode graph at context 512 (GPU timeline: busy time, idle gaps, per
kernel), the served time per decode step of a 128-token prompt generating 129 tokens (3 runs), and
the greedy tokens. Writes OUT/LABEL.json.

Run from the repository root on a GPU:
    PYTHONPATH=. python3 results/bench_engine_nvidia_h200/pdl/ab.py OUT on
    WORKBENCH_PDL=0 PYTHONPATH=. python3 results/bench_engine_nvidia_h200/pdl/ab.py OUT off
"""
import json
import os
import sys
import time

from pathlib import Path

import torch

from engine import LLM, SamplingParams
from kernels.device import programmatic_launch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
import batch1  # noqa: E402


def served_ms_per_step(llm: LLM, prompt: list[int], params: SamplingParams) -> float:
    walls = []
    llm.add_request(prompt, params)
    llm.step()  # prefill
    while llm.has_unfinished():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.step()
        walls.append(((time.perf_counter() - t0) * 1e3, llm.last_batch.num_steps))
    return sum(w for w, _ in walls) / sum(n for _, n in walls)


def main(out: str, label: str) -> None:
    res: dict = {"label": label, "pdl": programmatic_launch(), **batch1.environment()}
    llm = batch1.engine(async_scheduling=False)  # as when this ran: it syncs before every step
    res["floor_ms"] = batch1.floor_ms(llm, res["copy_GBps"])
    prompts = [torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (128, 37, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    res["tokens"] = [o.token_ids for o in llm.generate(prompts, [params] * 3, use_tqdm=False)]
    res["served_ms_per_step"] = [served_ms_per_step(llm, prompts[0], params) for _ in range(3)]
    summary = batch1.graph_span(llm)
    whole = summary[summary.kernel == "graph replay"].iloc[0]
    res.update(graph_busy_us=float(whole.busy_us), graph_gap_us=float(whole.gap_us), graph_kernels=int(whole.calls),
               kernels=summary[["kernel", "calls", "busy_us", "gap_us"]].to_dict("records"))
    print({k: v for k, v in res.items() if k not in ("tokens", "kernels")}, flush=True)
    json.dump(res, open(os.path.join(out, f"{label}.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
