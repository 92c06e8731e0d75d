"""Persistent, software-pipelined GEMVs at the batch-1 decode shapes of llama-3.2-1b (NOTES.md in this
folder), against the kernels the engine runs: bfloat16, M = 1, cold L2, timed in CUDA graphs
(autotune.timing.gpu_time). Each program of a persistent grid walks its column blocks and, within
each, its K steps as one flat loop that Triton pipelines NS deep, so the next tiles of W are in
flight while one is multiplied. W's tiles come either through TMA (a tensor descriptor) or plain
loads (cp.async). Every result is checked against a float64 product. Writes OUT/gemv_stream.csv.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/gemv_stream/explore.py OUT
"""
import itertools
import sys
import time

import pandas as pd
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import kernels
from autotune.timing import gpu_time


@triton.jit
def gemv_flat(x_ptr, w_ptr, w_desc, c_ptr, N, K, stride_wn, NPROG, BN: tl.constexpr, BK: tl.constexpr,
              NS: tl.constexpr, TMA: tl.constexpr):
    pid = tl.program_id(0)
    k_tiles = K // BK
    mine = (N // BN - pid + NPROG - 1) // NPROG
    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, BN)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for i in tl.range(0, mine * k_tiles, num_stages=NS):
        tile = pid + (i // k_tiles) * NPROG
        kb = i % k_tiles
        if TMA:
            w = w_desc.load([tile * BN, kb * BK])
        else:
            w = tl.load(w_ptr + (tile * BN + offs_n).to(tl.int64)[:, None] * stride_wn + (kb * BK + offs_k)[None, :],
                        eviction_policy="evict_first")
        x = tl.load(x_ptr + kb * BK + offs_k).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if kb == k_tiles - 1:
            tl.store(c_ptr + tile * BN + offs_n, tl.sum(acc, axis=1).to(c_ptr.dtype.element_ty))
            acc = tl.zeros((BN, BK), dtype=tl.float32)


SHAPES = {"qkv": (3072, 2048), "o_proj": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}


def main(out: str) -> None:
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gemm = kernels.get_family("gemm")
    for name, (N, K) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, K, generator=g).cuda().bfloat16()
        w = (torch.randn(N, K, generator=g) / K**0.5).cuda().bfloat16()
        ref = (x.double() @ w.double().t()).float()
        c = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)

        def record(kind, cfg, fn):
            c.fill_(float("nan"))
            fn()
            err = float((c.float() - ref).abs().max() / ref.abs().max())
            us = gpu_time(fn)[0] * 1e3
            rows.append({"shape": name, "N": N, "K": K, "kind": kind, **cfg, "us": us, "TBps": N * K * 2 / us / 1e6,
                         "rel_err": err})
            print(rows[-1], flush=True)

        shape = {"M": 1, "N": N, "K": K, "b_transposed": True}
        cfg = gemm.default_config(shape, "bfloat16")
        record("engine gemv (default)", {"BN": cfg["BLOCK_N"], "BK": cfg["BLOCK_K"], "warps": cfg["num_warps"],
                                         "NS": cfg["num_stages"]}, lambda: gemm.call(x, w.t(), config=cfg, out=c))
        for tma, bn, bk, ns, warps, waves in itertools.product((True, False), (16, 32), (128, 256), (3, 5), (4,),
                                                               (1, 2)):
            if N % bn or K % bk or (tma and bn > 256):
                continue
            nprog = min(sms * waves, N // bn)
            desc = TensorDescriptor.from_tensor(w, [bn, bk])
            launch = lambda: gemv_flat[(nprog,)](x, w, desc, c, N, K, w.stride(0), nprog, BN=bn, BK=bk, NS=ns, TMA=tma,
                                                   num_warps=warps)
            try:
                record("flat " + ("tma" if tma else "cp.async"), {"BN": bn, "BK": bk, "warps": warps, "NS": ns,
                                                                   "programs": nprog}, launch)
            except Exception as e:  # a config the compiler rejects (shared memory) is skipped
                print("skip", name, tma, bn, bk, ns, warps, type(e).__name__, str(e)[:120], flush=True)
        frame = pd.DataFrame(rows)
        frame.insert(0, "device", torch.cuda.get_device_name())
        frame.insert(1, "date", time.strftime("%Y-%m-%d"))
        frame.to_csv(f"{out}/gemv_stream.csv", index=False)


if __name__ == "__main__":
    main(sys.argv[1])
