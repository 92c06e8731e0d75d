"""What the batch-1 decode scripts of this folder share (pdl/, async/, rope_attention/,
context_buckets/): the run's environment, the engine they time (random-init llama-3.2-1b, bfloat16,
CUDA graphs, windows of 8 steps), its weight-streaming floor, capturing its graphs again, its decode
graph's timeline at one context length, the request they serve and the served time per step.

A script imports it as ``batch1`` after putting this folder on ``sys.path``:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
"""
import statistics
import time

import pandas as pd
import torch
from omegaconf import OmegaConf

from engine import LLM, SamplingParams
from engine.profile import graph_timeline, timeline_summary
from experiments.bench_engine import ensure_checkpoint
from experiments.suite import copy_bandwidth_gbps


def environment() -> dict:
    """Device, versions, date and the device's copy bandwidth (GB/s) measured now."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
            "copy_GBps": copy_bandwidth_gbps()}


def engine(**settings) -> LLM:
    """The engine every script times; ``settings`` override or add LLM arguments."""
    model = OmegaConf.load("conf/model/llama-3.2-1b.yaml")
    path = ensure_checkpoint(OmegaConf.create({"checkpoint_dir": None, "checkpoint_root": "results/runs/checkpoints"}),
                             model, "bfloat16")
    return LLM(path, **{"dtype": "bfloat16", "max_num_seqs": 8, "max_model_len": 1024, "num_decode_steps": 8,
                        "gpu_memory_utilization": 0.3, **settings})


def floor_ms(llm: LLM, copy_gbps: float) -> float:
    """The decode step's weight bytes over the copy bandwidth, in ms."""
    return llm.runner.model.weights.decode_bytes() / (copy_gbps * 1e6)


def recapture(llm: LLM, contexts: list[int] | None = None) -> None:
    """Capture the engine's decode graphs again (after a setting changed), at ``contexts`` (context
    buckets) when given."""
    g = llm.runner.graphs
    if contexts is not None:
        g.contexts = contexts
    g._graphs = {}
    g._capture()


def graph_span(llm: LLM, context: int = 512, replays: int = 10) -> pd.DataFrame:
    """``engine.profile.timeline_summary`` of the batch-1 decode graph at ``context`` tokens."""
    ids, positions, meta = llm.runner.dummy_inputs(1, 1, context)
    return timeline_summary(graph_timeline(llm.runner.graphs.load(ids, positions, meta), replays=replays))


def kernel_records(span: pd.DataFrame) -> list[dict]:
    """The rows of :func:`graph_span` as JSON records: kernel, calls, busy_us, gap_us."""
    return span[["kernel", "calls", "busy_us", "gap_us"]].to_dict("records")


def request() -> tuple[list[int], SamplingParams]:
    """The served request: a 128-token prompt (seeded) generating 129 greedy tokens."""
    prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    return prompt, SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)


def served(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, float, list[int]]:
    """(decode wall ms / decode steps, median over windows of window ms / its steps, tokens). No
    host sync between steps: that would stall a window launched ahead."""
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


def timed_runs(llm: LLM, prompt: list[int], params: SamplingParams, runs: int = 3) -> dict:
    """``runs`` of :func:`served`: their wall and median-window ms per step, the first run's tokens,
    and whether every run gave those."""
    out = [served(llm, prompt, params) for _ in range(runs)]
    return {"wall_ms_per_step": [r[0] for r in out], "median_window_ms_per_step": [r[1] for r in out],
            "tokens": out[0][2], "same_tokens": all(r[2] == out[0][2] for r in out)}
