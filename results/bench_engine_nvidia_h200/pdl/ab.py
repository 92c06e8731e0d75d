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

import torch
from omegaconf import OmegaConf

from engine import LLM, SamplingParams
from engine.profile import graph_timeline, timeline_summary
from experiments.bench_engine import ensure_checkpoint
from experiments.suite import copy_bandwidth_gbps
from kernels.device import programmatic_launch


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
    res: dict = {"label": label, "pdl": programmatic_launch(), "device": torch.cuda.get_device_name(),
                 "torch": torch.__version__, "triton": __import__("triton").__version__,
                 "date": time.strftime("%Y-%m-%d"), "copy_GBps": copy_bandwidth_gbps()}
    model = OmegaConf.load("conf/model/llama-3.2-1b.yaml")
    path = ensure_checkpoint(OmegaConf.create({"checkpoint_dir": None, "checkpoint_root": "results/runs/checkpoints"}),
                             model, "bfloat16")
    llm = LLM(path, dtype="bfloat16", max_num_seqs=8, max_model_len=1024, num_decode_steps=8, gpu_memory_utilization=0.3)
    res["floor_ms"] = llm.runner.model.weights.decode_bytes() / (res["copy_GBps"] * 1e6)
    prompts = [torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (128, 37, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    res["tokens"] = [o.token_ids for o in llm.generate(prompts, [params] * 3, use_tqdm=False)]
    res["served_ms_per_step"] = [served_ms_per_step(llm, prompts[0], params) for _ in range(3)]
    ids, positions, meta = llm.runner.dummy_inputs(1, 1, 512)
    summary = timeline_summary(graph_timeline(llm.runner.graphs.load(ids, positions, meta), replays=10))
    whole = summary[summary.kernel == "graph replay"].iloc[0]
    res.update(graph_busy_us=float(whole.busy_us), graph_gap_us=float(whole.gap_us), graph_kernels=int(whole.calls),
               kernels=summary[["kernel", "calls", "busy_us", "gap_us"]].to_dict("records"))
    print({k: v for k, v in res.items() if k not in ("tokens", "kernels")}, flush=True)
    json.dump(res, open(os.path.join(out, f"{label}.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
