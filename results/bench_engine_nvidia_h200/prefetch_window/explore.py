"""The L2-prefetch and window-graph experiment of NOTES.md (llama-3.2-1b, random init, bfloat16, CUDA
graphs): for each prefetch budget (bytes of the output projection's and then gate/up's weights
prefetched after each layer's QKV GEMV) and chunk size, the decode graph at batch 1 and context 512
(GPU timeline: busy and idle time, per kernel), its logits against those without a prefetch, and
the served time per decode step of a 128-token prompt generating 129 tokens in windows of 8 steps
(one graph per window, and a step graph per step for comparison). Writes OUT/prefetch.json.

It runs on commit 04255c4 only: the commit after it removed the prefetch (kernels.l2_prefetch, the
ops' ``prefetch``) and the window graphs (DecodeGraphs' ``window_steps``) that it switches.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/prefetch_window/explore.py OUT
"""
import json
import sys
import time

import torch
from omegaconf import OmegaConf

import kernels.l2_prefetch as pf
from engine import LLM, SamplingParams
from engine.cuda_graphs import batch_buckets
from engine.profile import graph_timeline, timeline_summary
from experiments.bench_engine import ensure_checkpoint
from experiments.suite import copy_bandwidth_gbps

MB = 1 << 20


def served_ms_per_step(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list]:
    walls = []
    llm.add_request(prompt, params)
    llm.step()  # prefill
    while llm.has_unfinished():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.step()
        walls.append(((time.perf_counter() - t0) * 1e3, llm.last_batch.num_steps))
    return sum(w for w, _ in walls) / sum(n for _, n in walls), walls


def main(out: str) -> None:
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
                 "copy_GBps": copy_bandwidth_gbps(), "variants": []}
    model = OmegaConf.load("conf/model/llama-3.2-1b.yaml")
    path = ensure_checkpoint(OmegaConf.create({"checkpoint_dir": None, "checkpoint_root": "results/runs/checkpoints"}),
                             model, "bfloat16")
    llm = LLM(path, dtype="bfloat16", max_num_seqs=8, max_model_len=1024, num_decode_steps=8, gpu_memory_utilization=0.3)
    res["floor_ms"] = llm.runner.model.weights.decode_bytes() / (res["copy_GBps"] * 1e6)
    print(res, flush=True)
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    ops, runner = llm.runner.model.ops, llm.runner
    ids, positions, meta = runner.dummy_inputs(1, 1, 512)
    o = llm.runner.model.weights.layers[0].o
    n = o.numel() * o.element_size()
    compiled = pf.l2_prefetch_kernel[(1,)](o.data_ptr(), n, 0, 0, n // pf.CHUNK, n // pf.CHUNK, CHUNK=pf.CHUNK,
                                           LANES=pf.LANES, num_warps=1)
    res["ptx_has_bulk_prefetch"] = "cp.async.bulk.prefetch.L2.global" in compiled.asm["ptx"]
    ref = None
    tokens_ref = None
    variants = [(0, pf.CHUNK, True), (0, pf.CHUNK, False), (8, pf.CHUNK, True), (16, pf.CHUNK, True),
                (24, pf.CHUNK, True), (32, pf.CHUNK, True), (40, pf.CHUNK, True), (48, pf.CHUNK, True),
                (24, 4096, True), (24, 65536, True), (32, 65536, True)]
    default_chunk = pf.CHUNK
    for mb, chunk, window_graph in variants:
        ops.l2_prefetch_bytes, pf.CHUNK = mb * MB, chunk
        runner.capture_decode_graphs(batch_buckets(8), llm.max_model_len, window_steps=8)
        if not window_graph:
            runner.graphs._windows.clear()
        launch = runner.graphs.load(ids, positions, meta)
        logits = launch()[:1].clone()
        ref = logits if ref is None else ref
        summary = timeline_summary(graph_timeline(launch, replays=10))
        whole = summary[summary.kernel == "graph replay"].iloc[0]
        llm.generate([prompt], [params], use_tqdm=False)  # first-call costs
        served = [served_ms_per_step(llm, prompt, params)[0] for _ in range(3)]
        outs = llm.generate([prompt], [params], use_tqdm=False)[0].token_ids
        tokens_ref = outs if tokens_ref is None else tokens_ref
        row = {"prefetch_MB": mb, "chunk": chunk, "window_graph": window_graph,
               "graph_busy_us": float(whole.busy_us), "graph_gap_us": float(whole.gap_us),
               "graph_kernels": int(whole.calls), "served_ms_per_step": served,
               "logits_equal": bool(torch.equal(logits, ref)), "tokens_equal": outs == tokens_ref,
               "kernels": summary[["kernel", "calls", "busy_us", "gap_us"]].to_dict("records")}
        res["variants"].append(row)
        print({k: v for k, v in row.items() if k != "kernels"}, flush=True)
        json.dump(res, open(f"{out}/prefetch.json", "w"), indent=1)
    pf.CHUNK = default_chunk


if __name__ == "__main__":
    main(sys.argv[1])
