"""The MLP of a batch-1 decode step several ways, in one process (NOTES.md): 16 layers of
llama-3.2-1b's MLP (hidden 2048, intermediate 8192, bfloat16, random weights) as one CUDA graph per
variant, each layer:
- "silu_gemv": norm_gemv (residual add, RMSNorm, gate/up GEMV -> gate_up [1, 16384]), then
  silu_gemv (SwiGLU and the down GEMV), the engine's decode MLP;
- "swiglu": norm_gemv with swiglu=True (the same, writing silu(gate) * up [1, 8192]), then the
  gemm family's plain GEMV for the down projection;
- "swiglu_gemv_default": the same with the GEMV tile of kernels.gemm.gemv_default for the down
  projection, and "swiglu16_gemv_default" with 16 gate/up columns a program too;
- "gate_up_only" and "swiglu_only": the first kernel alone (no down projection), to separate the
  epilogue's cost from the down projection's.
Configs otherwise as the engine resolves them (the device's best-config cache, nearest shape
allowed). Each full variant is checked against a float64 reference of the 16 layers, then every
variant is timed: 5 interleaved rounds of 50 replays (CUDA events), the weights (1.6 GB) far larger
than L2. Writes OUT/swiglu_ab.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/decode_fusion/swiglu_ab.py OUT
It runs on commit 809b056 only: the SwiGLU epilogue (norm_gemv's swiglu) and the engine's use of it were
reverted after these measurements.
"""
import json
import os
import sys
import time

import torch

from autotune import cache
from kernels.gemm import gemv_default, matmul
from kernels.norm_gemv import norm_gemv
from kernels.silu_gemv import silu_gemv
from kernels.device import programmatic_launch

H, I, LAYERS, EPS = 2048, 8192, 16, 1e-5


def config(family: str, shape: dict) -> dict | None:
    entry = cache.lookup(family, shape, "bfloat16")
    return entry["config"] if entry else None


def main(out: str) -> None:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w_gu = [(torch.randn(2 * I, H, generator=g, device=dev) / H**0.5).to(dt) for _ in range(LAYERS)]
    w_d = [(torch.randn(H, I, generator=g, device=dev) / I**0.5).to(dt) for _ in range(LAYERS)]
    norm_w = [(1 + 0.1 * torch.randn(H, generator=g, device=dev)).to(dt) for _ in range(LAYERS)]
    x0 = torch.randn(1, H, generator=g, device=dev).to(dt)
    r0 = torch.randn(1, H, generator=g, device=dev).to(dt)
    cfg = {"gate_up": config("norm_gemv", {"M": 1, "N": 2 * I, "K": H, "residual": True}),
           "swiglu": config("norm_gemv", {"M": 1, "N": 2 * I, "K": H, "residual": True, "swiglu": True}),
           "silu_gemv": config("silu_gemv", {"M": 1, "N": H, "K": I}),
           "down": config("gemm", {"M": 1, "N": H, "K": I, "b_transposed": True})}
    cfg["down_default"] = {**cfg["down"], **gemv_default(1, H, I)}
    cfg["swiglu16"] = {**cfg["swiglu"], "BLOCK_N": 16, "num_warps": 2}
    bufs = {"gu": torch.empty(1, 2 * I, device=dev, dtype=dt), "act": torch.empty(1, I, device=dev, dtype=dt),
            "res": [torch.empty(1, H, device=dev, dtype=dt) for _ in range(LAYERS + 1)],
            "h": [torch.empty(1, H, device=dev, dtype=dt) for _ in range(LAYERS + 1)]}

    def forward(kind: str) -> torch.Tensor:
        hs = list(bufs["h"])  # the "_only" variants feed a layer's input on to the next
        hs[0].copy_(x0)
        bufs["res"][0].copy_(r0)
        for l in range(LAYERS):
            h, r, r_out = hs[l], bufs["res"][l], bufs["res"][l + 1]
            if kind in ("silu_gemv", "gate_up_only"):
                norm_gemv(h, norm_w[l], EPS, w_gu[l], residual=r, config=cfg["gate_up"], out=bufs["gu"], residual_out=r_out)
                if kind == "silu_gemv":
                    silu_gemv(bufs["gu"], w_d[l], config=cfg["silu_gemv"], out=hs[l + 1])
                else:
                    hs[l + 1] = h
            else:
                norm_gemv(h, norm_w[l], EPS, w_gu[l], residual=r, swiglu=True,
                          config=cfg["swiglu16" if kind.startswith("swiglu16") else "swiglu"], out=bufs["act"],
                          residual_out=r_out)
                if kind == "swiglu_only":
                    hs[l + 1] = h
                else:
                    down = cfg["down_default" if kind.endswith("gemv_default") else "down"]
                    matmul(bufs["act"], w_d[l].t(), config=down, out=hs[l + 1])
        return hs[LAYERS]

    def reference() -> torch.Tensor:
        h, r = x0.double(), r0.double()
        for l in range(LAYERS):
            s = h + r
            r = s.to(dt).double()
            y = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * norm_w[l].double()
            gate, up = (y @ w_gu[l].double().t()).chunk(2, -1)
            h = (gate * torch.sigmoid(gate) * up) @ w_d[l].double().t()
        return h

    ref = reference()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
           "date": time.strftime("%Y-%m-%d"), "pdl": programmatic_launch(), "configs": cfg, "rounds": []}
    graphs = {}
    for kind in ("silu_gemv", "swiglu", "swiglu_gemv_default", "swiglu16_gemv_default", "gate_up_only", "swiglu_only"):
        y = forward(kind).double()  # compiles
        if not kind.endswith("_only"):
            res[f"{kind}_rel_error"] = float((y - ref).norm() / ref.norm())
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(kind)
        graphs[kind] = graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for rnd in range(5):
        for kind, graph in graphs.items():
            graph.replay()
            start.record()
            for _ in range(50):
                graph.replay()
            end.record()
            end.synchronize()
            us = start.elapsed_time(end) * 1e3 / 50
            res["rounds"].append({"round": rnd, "kind": kind, "us_per_graph": us, "us_per_layer": us / LAYERS})
            print(res["rounds"][-1], flush=True)
    print({k: v for k, v in res.items() if k != "rounds"}, flush=True)
    json.dump(res, open(os.path.join(out, "swiglu_ab.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
