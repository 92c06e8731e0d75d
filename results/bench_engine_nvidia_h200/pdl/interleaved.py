"""Programmatic dependent launch on and off in one process, interleaved (NOTES.md): the batch-1
decode of llama-3.2-1b (random init, bfloat16, CUDA graphs, windows of 8 steps). For each of 3
rounds of (on, off), the families' emitted modules are reloaded with the setting
(``WORKBENCH_PDL``) and the graphs recaptured; then the decode graph's span at context 512, the
served time per step of a 128-token prompt generating 129 tokens (3 runs), and the GPU timeline of
one served window (its span, and the idle time between its kernels). Writes OUT/interleaved.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/pdl/interleaved.py OUT
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

import kernels
from engine import LLM, SamplingParams
from engine.cuda_graphs import batch_buckets
from engine.profile import timeline_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this folder's parent: batch1.py
import batch1  # noqa: E402

from ab import served_ms_per_step  # this folder's A/B script (the script's folder is on sys.path)

FAMILIES = ("gemm", "norm_gemv", "silu_gemv", "rope", "attention_paged", "rmsnorm")


def profile_window(llm: LLM, prompt: list[int], params: SamplingParams) -> dict:
    """Serve one request; the GPU timeline of its fifth decode call (a window in its middle)."""
    llm.add_request(prompt, params)
    for _ in range(5):  # the prefill and four decode calls
        llm.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    steps = llm.last_batch.num_steps
    while llm.has_unfinished():
        llm.step()
    rows = timeline_rows([(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                          if e.device_type == DeviceType.CUDA], 1)
    return {"steps": steps, "wall_ms": wall, "kernels": len(rows),
            "gpu_span_us": float((rows.start_us + rows.dur_us).max()), "idle_us": float(rows.gap_us.sum()),
            "largest_gaps": rows.nlargest(6, "gap_us")[["position", "kernel", "gap_us"]].to_dict("records")}


def main(out: str) -> None:
    res: dict = {**batch1.environment(), "rounds": []}
    llm = batch1.engine(async_scheduling=False)  # as when this ran: one window a step() call
    res["floor_ms"] = batch1.floor_ms(llm, res["copy_GBps"])
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    for rnd in range(3):
        for pdl in ("1", "0"):
            os.environ["WORKBENCH_PDL"] = pdl
            for f in FAMILIES:
                kernels.get_family(f)._resolved.clear()
            llm.runner.capture_decode_graphs(batch_buckets(8), llm.max_model_len)
            tokens = llm.generate([prompt], [params], use_tqdm=False)[0].token_ids  # first calls
            span = batch1.graph_span(llm)
            walls = [served_ms_per_step(llm, prompt, params) for _ in range(3)]
            window = profile_window(llm, prompt, params)
            row = {"round": rnd, "pdl": pdl == "1", "graph_span_us": float(span.busy_us.iloc[-1]),
                   "served_ms_per_step": walls, "window": window, "tokens": tokens}
            res["rounds"].append(row)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
            json.dump(res, open(os.path.join(out, "interleaved.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
