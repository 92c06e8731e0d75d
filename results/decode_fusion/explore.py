"""The measurements behind results/decode_fusion/NOTES.md, batch-1 decode shapes of llama-3.2-1b,
bfloat16, cold L2, timed in CUDA graphs (autotune.timing.gpu_time, the tuner's timing):

- norm_gemv with and without the residual add fused in (QKV 3072x2048 and gate/up 16384x2048), over
  tiles of 1-8 columns, K steps of 512-2048 and 1-4 warps, next to the plain GEMV (gemm's gemv);
- attention_paged for one sequence (Hq 32, Hkv 8, D 128, block 16) at contexts 256 and 512 under a
  captured maximum of 2048: the decode variant (no split, no merge) against decode_split (+ merge).

Every config's output is checked against the family's float64 reference. Writes OUT/*.csv.
Run from the repository root on a GPU: PYTHONPATH=. python3 results/decode_fusion/explore.py OUT
"""
import itertools
import sys
import time

import pandas as pd
import torch

import kernels
from autotune.timing import gpu_time


def time_config(fam, inputs, cfg) -> tuple[float, float]:
    ref = fam.reference(inputs).float()
    out = fam.run(inputs, cfg).float()
    err = float((out - ref).abs().max() / ref.abs().max())
    return gpu_time(fam.timed_call(inputs, cfg))[0] * 1e3, err


def gemvs(out: str) -> None:
    rows = []
    norm, gemm = kernels.get_family("norm_gemv"), kernels.get_family("gemm")
    tiles = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": 1}
             for bn, bk, w in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (1, 2, 4))]
    tiles += [{"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": w, "num_stages": s} for w, s in ((1, 1), (2, 4))]
    for N in (3072, 16384):
        for residual in (True, False):
            shape = {"M": 1, "N": N, "K": 2048, "residual": residual}
            inputs = norm.make_inputs(shape, "bfloat16", "cuda")
            for cfg in tiles:
                if norm.reject(shape, "bfloat16", cfg) is not None:
                    continue
                us, err = time_config(norm, inputs, cfg)
                rows.append({"family": "norm_gemv", "N": N, "residual": residual, **cfg, "us": us, "rel_err": err})
                print(rows[-1], flush=True)
        shape = {"M": 1, "N": N, "K": 2048, "b_transposed": True}
        inputs = gemm.make_inputs(shape, "bfloat16", "cuda")
        cfg = gemm.default_config(shape, "bfloat16")
        us, err = time_config(gemm, inputs, cfg)
        rows.append({"family": "gemm", "N": N, "residual": False, **{k: cfg[k] for k in tiles[0]}, "us": us,
                     "rel_err": err})
        print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    frame.insert(0, "device", torch.cuda.get_device_name())
    frame.insert(1, "date", time.strftime("%Y-%m-%d"))
    frame.to_csv(f"{out}/norm_gemv_residual.csv", index=False)


def attention(out: str) -> None:
    fam, rows = kernels.get_family("attention_paged"), []
    shape = {"batch": 1, "query_len": 1, "context_len": 2048, "heads_q": 32, "heads_kv": 8, "head_dim": 128,
             "block_size": 16}
    configs = [{"variant": "decode", "SPLIT": 1, "TILE": t, "HEADS": 4, "BLOCK_Q": 1, "num_warps": w, "num_stages": s}
               for t, w, s in itertools.product((32, 64, 128), (2, 4), (2, 3))]
    configs += [{"variant": "decode_split", "SPLIT": sp, "TILE": t, "HEADS": 4, "BLOCK_Q": 1, "num_warps": w,
                 "num_stages": 2} for sp, t, w in itertools.product((8, 16, 32), (32, 64), (2, 4))]
    for ctx in (256, 512):
        inputs = fam.make_inputs(shape, "bfloat16", "cuda", context_lens=[ctx])
        for cfg in configs:
            try:  # the call's shape is bucketed from the inputs: some configs do not fit it
                us, err = time_config(fam, inputs, cfg)
            except ValueError:
                continue
            rows.append({"context": ctx, **cfg, "us": us, "rel_err": err})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    frame.insert(0, "device", torch.cuda.get_device_name())
    frame.insert(1, "date", time.strftime("%Y-%m-%d"))
    frame.to_csv(f"{out}/attention_decode.csv", index=False)


if __name__ == "__main__":
    attention(sys.argv[1])
    gemvs(sys.argv[1])
