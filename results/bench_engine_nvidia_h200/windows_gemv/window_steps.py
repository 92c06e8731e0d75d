"""The window experiment of NOTES.md: argmax of one row of logits, then the batch-1 decode step at
num_decode_steps 1, 8, 16 and 32 (llama-3.2-1b, random init, CUDA graphs). Writes OUT/window.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/windows_gemv/window_steps.py OUT
"""
import json
import sys
import time

import torch
from omegaconf import OmegaConf

from autotune.timing import gpu_time
from engine import LLM, SamplingParams
from engine.sampler import greedy_argmax
from experiments.bench_engine import ensure_checkpoint


def main(out: str) -> None:
    res = {}
    logits = torch.randn(1, 128256, device="cuda")
    o = torch.empty(1, dtype=torch.int64, device="cuda")
    res["argmax_us"] = gpu_time(lambda: torch.argmax(logits, dim=-1, out=o))[0] * 1e3
    res["greedy_argmax_us"] = gpu_time(lambda: greedy_argmax(logits, out=o))[0] * 1e3
    print(res, flush=True)
    model = OmegaConf.load("conf/model/llama-3.2-1b.yaml")
    path = ensure_checkpoint(OmegaConf.create({"checkpoint_dir": None, "checkpoint_root": "results/runs/checkpoints"}),
                             model, "bfloat16")
    for k in (1, 8, 16, 32):
        llm = LLM(path, dtype="bfloat16", max_num_seqs=8, max_model_len=1024, num_decode_steps=k,
                  gpu_memory_utilization=0.3)
        prompt = torch.randint(10, 1000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
        llm.generate([prompt], [params], use_tqdm=False)
        walls = []
        llm.add_request(prompt, params)
        llm.step()  # prefill
        while llm.has_unfinished():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.step()
            walls.append(((time.perf_counter() - t0) * 1e3, llm.last_batch.num_steps))
        total = sum(w for w, _ in walls) / sum(n for _, n in walls)
        res[f"k{k}"] = {"ms_per_step": total, "windows": walls}
        print(k, total, walls[:6], flush=True)
        del llm
        torch.cuda.empty_cache()
    json.dump(res, open(f"{out}/window.json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
