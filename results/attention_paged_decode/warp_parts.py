"""Paged decode with each warp owning a slice of every key tile: a prototype timed against the tuned kernel.

    python -m results.attention_paged_decode.warp_parts --out DIR [--points 1,2] [--quick --dtype float16]

The committed kernel's score tile [16 rows, TILE keys] is spread over the warps along the keys, so
each tile's row max, row sum and the probabilities' trip into the second dot cross warps (shared
memory and a barrier). Here the tile is [PARTS, 16, SUB] with PARTS = num_warps: tl.dot on 3-D
operands puts one part per warp (warpsPerCTA [PARTS, 1, 1] in the sm_90 TTGIR), each part keeps its
own online softmax over its keys, and the parts merge once, after the loop, by their maxima.

Per point (``attention_suite.DECODE``), in one process: the prototype's configs, each checked
against the float64 reference on a NaN-poisoned output, then timed with the tuned kernel (the
device cache's config) and SDPA (cold-L2 CUDA-graph replays, median). Writes ``warp_parts.csv``
(device, versions, date in every row).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import pandas as pd

import kernels  # before triton: it picks the interpreter on a machine without a GPU
import triton
import triton.language as tl

from experiments.attention_suite import cached_or_default, decode_points
from experiments.suite import provenance
from kernels.device import default_device, device_facts
from kernels.family import rel_error
from results.attention_paged_decode.timed import time_each

FAMILY = "attention_paged"
CONFIGS = [(4, 32, 2), (4, 32, 3), (4, 16, 2), (4, 16, 3), (4, 64, 2), (2, 64, 2), (2, 32, 3), (8, 16, 2), (8, 32, 2)]


@triton.jit
def _parts_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, o_ptr, qk_scale, stride_qt, stride_qh,
                  stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                  GROUP: tl.constexpr, PARTS: tl.constexpr, SUB: tl.constexpr, D: tl.constexpr,
                  BS: tl.constexpr):
    """Decode (one query per sequence), grid (Hkv, B): the GROUP query heads of KV head
    program_id(0) in rows of a 16-row tile; each step reads PARTS * SUB keys, part j the SUB keys
    from j * SUB. K and V caches share strides."""
    h = tl.program_id(0)
    seq = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    rows = tl.arange(0, 16)
    offs_d = tl.arange(0, D)
    head = h * GROUP + rows
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=(rows < GROUP)[:, None], other=0.0)
    q3 = tl.broadcast_to(q[None, :, :], (PARTS, 16, D))
    acc = tl.zeros((PARTS, 16, D), tl.float32)
    l_i = tl.zeros((PARTS, 16), tl.float32)
    m_i = tl.full((PARTS, 16), -1.0e30, tl.float32)
    key = tl.arange(0, PARTS)[:, None] * SUB + tl.arange(0, SUB)[None, :]
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    for start in range(0, ctx, PARTS * SUB):
        pos = start + key
        seen = pos < ctx
        blk = tl.load(bt_row + pos // BS, mask=seen, other=0).to(tl.int64)
        row = blk * stride_kb + (pos % BS) * stride_ks + h * stride_kh
        k = tl.load(k_ptr + row[:, :, None] + offs_d[None, None, :], mask=seen[:, :, None], other=0.0)
        qk = tl.dot(q3, tl.permute(k, (0, 2, 1)))
        qk = tl.where(seen[:, None, :], qk * qk_scale, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(qk, 2))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        v = tl.load(v_ptr + row[:, :, None] + offs_d[None, None, :], mask=seen[:, :, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, :, None])
        m_i = m_new
    m = tl.max(m_i, 0)
    w = tl.math.exp2(m_i - m[None, :])
    out = tl.sum(acc * w[:, :, None], 0) / tl.sum(l_i * w, 0)[:, None]
    tl.store(o_ptr + seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None])


def parts_call(inputs: dict, parts: int, sub: int, stages: int) -> Callable[[], object]:
    """A zero-argument launch of the prototype on a decode batch of ``inputs`` (writes ``inputs['out']``)."""
    q, kc, vc, bt, out = (inputs[n] for n in ("q", "k_cache", "v_cache", "block_tables", "out"))
    hkv = kc.shape[2]
    group = q.shape[1] // hkv
    scale = q.shape[2] ** -0.5 * 1.4426950408889634
    return lambda: _parts_kernel[(hkv, bt.shape[0])](
        q, kc, vc, bt, inputs["context_lens"], out, scale, q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        GROUP=group, PARTS=parts, SUB=sub, D=q.shape[2], BS=kc.shape[1], num_warps=parts, num_stages=stages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--points", default="1,2", help="indices into attention_suite.DECODE")
    parser.add_argument("--quick", action="store_true", help="the suite's quick decode point (a smoke test)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    fam = kernels.get_family(FAMILY)
    device = default_device()
    meta = provenance(device_facts(device))
    gpu = device.type == "cuda"
    points = decode_points(args.points, args.quick)
    rows = []
    for shape in points:
        inputs = fam.make_inputs(shape, args.dtype, device, seed=1)
        ref = fam.reference(inputs)
        tol = fam.tolerance(args.dtype, device)
        cfg = cached_or_default(fam, shape, args.dtype)
        timed = {"tuned " + json.dumps(cfg): fam.timed_call(inputs, cfg), "sdpa": lambda: fam.baseline(inputs)}
        for parts, sub, stages in CONFIGS:
            if args.quick and parts * sub > 64:
                continue
            call = parts_call(inputs, parts, sub, stages)
            inputs["out"].fill_(float("nan"))
            call()
            err = rel_error(inputs["out"], ref)
            if not err <= tol:  # NaN fails too
                raise RuntimeError(f"parts {parts} sub {sub} {stages}st: relative error {err:.3g} > {tol}")
            timed[f"parts {parts} x {sub} keys, {parts} warps, {stages}st"] = call
        rows += time_each(fam, shape, args.dtype, meta, timed, gpu)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(Path(args.out) / "warp_parts.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
