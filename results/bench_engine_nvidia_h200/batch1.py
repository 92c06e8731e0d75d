"""What the batch-1 decode scripts of this folder share (pdl/, async/): the run's environment, the
engine they time (random-init llama-3.2-1b, bfloat16, CUDA graphs, windows of 8 steps), its
weight-streaming floor, and its decode graph's timeline at one context length.

A script imports it as ``batch1`` after putting this folder on ``sys.path``:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
"""
import time

import pandas as pd
import torch
from omegaconf import OmegaConf

from engine import LLM
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


def graph_span(llm: LLM, context: int = 512, replays: int = 10) -> pd.DataFrame:
    """``engine.profile.timeline_summary`` of the batch-1 decode graph at ``context`` tokens."""
    ids, positions, meta = llm.runner.dummy_inputs(1, 1, context)
    return timeline_summary(graph_timeline(llm.runner.graphs.load(ids, positions, meta), replays=replays))
