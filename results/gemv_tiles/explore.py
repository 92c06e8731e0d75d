"""The GEMV tile exploration of results/gemv_tiles/NOTES.md: M=1 GEMVs at the decode shapes of llama-3.2-1b,
bfloat16, cold L2, timed in CUDA graphs (autotune.timing.gpu_time), over tiles, warps, pipeline depth,
W's eviction policy and a split-K variant with float32 atomics; cuBLAS, a copy and a sum of W alongside.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/gemv_tiles/explore.py OUT_DIR
"""
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

from autotune.timing import gpu_time


@triton.jit
def gemv(x_ptr, w_ptr, c_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         NS: tl.constexpr, EVICT: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NS):
        x = tl.load(x_ptr + k + offs_k).to(tl.float32)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + (k + offs_k)[None, :], eviction_policy=EVICT)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(c_ptr + offs_n, tl.sum(acc, axis=1).to(c_ptr.dtype.element_ty))


@triton.jit
def gemv_splitk(x_ptr, w_ptr, c_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                KSPAN: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k0 = tl.program_id(1) * KSPAN
    for k in tl.range(k0, k0 + KSPAN, BLOCK_K):
        x = tl.load(x_ptr + k + offs_k).to(tl.float32)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + (k + offs_k)[None, :], eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    tl.atomic_add(c_ptr + offs_n, tl.sum(acc, axis=1), sem="relaxed")


SHAPES = {"qkv": (3072, 2048), "o_proj": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


def main(out_dir: str) -> None:
    rows = []
    dev = "cuda"
    for name, (N, K) in SHAPES.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, K, generator=g).to(dev, torch.bfloat16)
        w = (torch.randn(N, K, generator=g) / K**0.5).to(dev, torch.bfloat16)
        ref = (x.double() @ w.double().t()).float()
        c = torch.empty(1, N, device=dev, dtype=torch.bfloat16)
        gbytes = N * K * 2 / 1e9
        us = gpu_time(lambda: torch.matmul(x, w.t()))[0] * 1e3
        rows.append({"shape": name, "kind": "cublas", "cfg": "", "us": us, "TBps": gbytes * 1e3 / us})
        dst = torch.empty_like(w)
        us = gpu_time(lambda: dst.copy_(w))[0] * 1e3
        rows.append({"shape": name, "kind": "copy(r+w)", "cfg": "", "us": us, "TBps": 2 * gbytes * 1e3 / us})
        us = gpu_time(lambda: torch.sum(w, dtype=torch.float32))[0] * 1e3
        rows.append({"shape": name, "kind": "sum(read)", "cfg": "", "us": us, "TBps": gbytes * 1e3 / us})
        for bn, bk, warps, ns, ev in itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048),
                                                        (1, 2, 4, 8), (1, 3), ("", "evict_first")):
            regs = bn * bk // (32 * warps)
            if not 8 <= regs <= 128 or bk > K or N % bn:
                continue
            fn = lambda: gemv[(N // bn,)](x, w, c, N, K, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, NS=ns, EVICT=ev,
                                          num_warps=warps, num_stages=ns)
            try:
                c.fill_(float("nan"))
                fn()
                err = ((c.float() - ref).abs().max() / ref.abs().max()).item()
                us = gpu_time(fn)[0] * 1e3
            except Exception as e:  # noqa: BLE001 -- a failing config is reported and skipped
                print(name, bn, bk, warps, ns, ev, "failed", str(e)[:200], flush=True)
                continue
            rows.append({"shape": name, "kind": "gemv", "cfg": f"bn{bn} bk{bk} w{warps} ns{ns} {ev or 'normal'}",
                         "us": us, "TBps": gbytes * 1e3 / us, "err": err})
        c32 = torch.empty(1, N, device=dev, dtype=torch.float32)
        for bn, bk, split, warps in itertools.product((4, 8, 16, 32), (256, 512, 1024), (2, 4, 8), (2, 4, 8)):
            regs = bn * bk // (32 * warps)
            if not 8 <= regs <= 128 or K % (split * bk) or N % bn:
                continue

            def fn(bn=bn, bk=bk, split=split, warps=warps):
                c32.zero_()
                gemv_splitk[(N // bn, split)](x, w, c32, N, K, w.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                              KSPAN=K // split, num_warps=warps)
            fn()
            err = ((c32 - ref).abs().max() / ref.abs().max()).item()
            us = gpu_time(fn)[0] * 1e3
            rows.append({"shape": name, "kind": "splitk+zero", "cfg": f"bn{bn} bk{bk} s{split} w{warps}",
                         "us": us, "TBps": gbytes * 1e3 / us, "err": err})
        best = sorted((r for r in rows if r["shape"] == name and r["kind"] != "copy(r+w)"), key=lambda r: r["us"])[:8]
        for r in best:
            print(json.dumps(r), flush=True)
    with open(os.path.join(out_dir, "gemv_explore.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
