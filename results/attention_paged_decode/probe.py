"""Where the tuned paged decode loses to cuDNN at (B 32, L 1024): streaming probes and a timeline.

    python -m results.attention_paged_decode.probe --out DIR [--points 1,2] [--quick --dtype float16]

Per point (``attention_suite.DECODE``), in one process:
- the tuned kernel (the device cache's config) and SDPA, the suite's timing (cold-L2 CUDA-graph
  replays, median);
- probes that read exactly the bytes the kernel reads, K and V of one KV head per program on the
  same grid, and do only the two dots (no softmax): over the paged cache through its random block
  table (``paged``), through an identity table computed without a load (``arith``: the pipeliner
  can prefetch), and over SDPA's contiguous [B, Hkv, L, D] cache (``contig``);
- a timeline of the tuned kernel: the template with ``globaltimer`` read at each program's start and
  after its output store, 20 cold launches (L2 flushed by zeroing before each), reported per launch
  as the spread of start and end times across programs.

Writes ``probe.csv`` and ``timeline_summary.csv`` (device, versions, date in every row).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

import kernels  # before triton: it picks the interpreter on a machine without a GPU
import triton
import triton.language as tl
from experiments.attention_suite import cached_or_default, decode_points
from experiments.suite import provenance
from experiments.template_ab import template_override
from kernels.device import default_device, device_facts
from kernels.generator import template_text
from results.attention_paged_decode.timed import time_each

FAMILY = "attention_paged"
FILE = "attention_paged.py.j2"


@triton.jit
def _stream(q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, ctx, stride_kb, stride_ks, stride_kh, stride_bt,
            HEADS_KV: tl.constexpr, TILE: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr):
    """out[seq, head] = sum over tiles of (q k^T) v, no softmax; grid (Hkv, B). MODE 0: K and V
    [blocks, BS, Hkv, D] through the block table; 1: the same layout, block seq * (ctx // BS) + i
    computed; 2: K and V [B, Hkv, ctx, D] contiguous (stride_kb: per sequence, stride_kh: per head)."""
    h = tl.program_id(0)
    seq = tl.program_id(1)
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (seq * HEADS_KV + h) * 16 * D + tl.arange(0, 16)[:, None] * D + offs_d[None, :])
    acc = tl.zeros((16, D), dtype=tl.float32)
    for start in range(0, ctx - TILE + 1, TILE):  # whole tiles only
        pos = start + offs_t
        if MODE == 0:
            blk = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + pos // BS).to(tl.int64)
            row = blk * stride_kb + (pos % BS) * stride_ks + h * stride_kh
        elif MODE == 1:
            blk = (seq * (ctx // BS) + pos // BS).to(tl.int64)
            row = blk * stride_kb + (pos % BS) * stride_ks + h * stride_kh
        else:
            row = seq.to(tl.int64) * stride_kb + h * stride_kh + pos * stride_ks
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :])
        s = tl.dot(q, tl.trans(k))
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :])
        acc = tl.dot(s.to(v.dtype), v, acc)
    tl.store(out_ptr + (seq * HEADS_KV + h) * 16 * D + tl.arange(0, 16)[:, None] * D + offs_d[None, :], acc)


def _probe(inputs: dict, mode: int, tile: int, warps: int, stages: int) -> tuple[Callable[[], object], torch.Tensor]:
    """A zero-argument launch of one streaming probe over ``inputs`` (MODE as in :func:`_stream`), and
    the output it writes (NaN until it runs)."""
    k, v = (inputs["_sdpa_kv"] if mode == 2 else (inputs["k_cache"], inputs["v_cache"]))
    bt = inputs["block_tables"]
    batch, hkv, d = bt.shape[0], inputs["k_cache"].shape[2], inputs["k_cache"].shape[3]
    ctx = int(inputs["context_lens"][0])
    q = torch.randn(batch, hkv, 16, d, generator=torch.Generator().manual_seed(0)).to(k) / d ** 0.5
    out = torch.full((batch, hkv, 16, d), float("nan"), device=k.device, dtype=torch.float32)
    strides = (k.stride(0), k.stride(2), k.stride(1)) if mode == 2 else (k.stride(0), k.stride(1), k.stride(2))
    return (lambda: _stream[(hkv, batch)](q, k, v, bt, out, ctx, *strides, bt.stride(0), HEADS_KV=hkv, TILE=tile,
                                          BS=inputs["k_cache"].shape[1], D=d, MODE=mode, num_warps=warps,
                                          num_stages=stages)), out


def timeline_template(text: str) -> str:
    """The paged template with each program's (SM, start time, end time) stored to ``TIMES``: the
    general and decode variants (not split-KV), ``globaltimer`` in ns."""
    edits = [
        ("import triton.language as tl\n",
         "import triton.language as tl\n\nTIMES = {}  # device -> int64 [programs, 3]\n\n\n"
         "def _times(device):\n"
         "    if device not in TIMES:\n"
         "        TIMES[device] = torch.zeros((1 << 16, 3), dtype=torch.int64, device=device)\n"
         "    return TIMES[device]\n"),
        ("    block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr, qk_scale,\n",
         "    block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr, qk_scale, times_ptr,\n"),
        ("    q_start = tl.load(cu_seqlens_q_ptr + seq)\n    q_len",
         "    t_start = tl.extra.cuda.globaltimer()\n    q_start = tl.load(cu_seqlens_q_ptr + seq)\n    q_len"),
        ("             out.to(o_ptr.dtype.element_ty), mask=q_mask)\n",
         "             out.to(o_ptr.dtype.element_ty), mask=q_mask)\n"
         "    t_end = tl.extra.cuda.globaltimer()\n"
         "    lin = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)\n"
         "    tl.store(times_ptr + lin * 3, tl.extra.cuda.smid().to(tl.int64))\n"
         "    tl.store(times_ptr + lin * 3 + 1, t_start)\n"
         "    tl.store(times_ptr + lin * 3 + 2, t_end)\n"),
        ("        block_tables, cu_seqlens_q, context_lens, sm_scale * 1.4426950408889634,\n",
         "        block_tables, cu_seqlens_q, context_lens, sm_scale * 1.4426950408889634, _times(q.device),\n"),
    ]
    for old, new in edits:
        if text.count(old) != 1:
            raise ValueError(f"timeline_template: {old!r} occurs {text.count(old)} times")
        text = text.replace(old, new)
    return text


def timeline(fam, inputs: dict, dtype: str, cfg: dict, launches: int) -> pd.DataFrame:
    """Per launch and program: SM, start and end in us from the launch's first start."""
    shape = fam.shape_of(inputs)
    with template_override(FAMILY, FILE, timeline_template(template_text(FILE))):
        _, module = fam.resolve(shape, dtype, cfg)
        call = fam.timed_call(inputs, cfg)
        call()
        torch.cuda.synchronize()
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        frames = []
        programs = None
        for n in range(launches):
            buf = module.TIMES[inputs["q"].device]
            buf.zero_()
            flush.zero_()
            call()
            torch.cuda.synchronize()
            t = buf.cpu()
            programs = programs or int((t[:, 1] > 0).sum())
            t = t[:programs]
            t0 = int(t[:, 1].min())
            frames.append(pd.DataFrame({"launch": n, "program": range(programs), "sm": t[:, 0].tolist(),
                                        "start_us": ((t[:, 1] - t0) / 1e3).tolist(),
                                        "end_us": ((t[:, 2] - t0) / 1e3).tolist()}))
    return pd.concat(frames)


def summarize(times: pd.DataFrame) -> pd.DataFrame:
    """Per launch of :func:`timeline`'s table: the programs, the last start, and quantiles of the end times (us)."""
    ends = times.groupby("launch")["end_us"]
    return pd.DataFrame({"programs": ends.count(), "last_start_us": times.groupby("launch")["start_us"].max(),
                         "first_end_us": ends.min(), "p10_end_us": ends.quantile(0.1), "p50_end_us": ends.median(),
                         "p90_end_us": ends.quantile(0.9), "last_end_us": ends.max()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--points", default="1,2", help="indices into attention_suite.DECODE")
    parser.add_argument("--quick", action="store_true", help="the suite's quick decode point, probes only")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--launches", type=int, default=20)
    args = parser.parse_args(argv)
    fam = kernels.get_family(FAMILY)
    device = default_device()
    meta = provenance(device_facts(device))
    gpu = device.type == "cuda"
    points = decode_points(args.points, args.quick)
    rows, frames = [], []
    for shape in points:
        inputs = fam.make_inputs(shape, args.dtype, device, seed=1)
        cfg = cached_or_default(fam, shape, args.dtype)
        fam.baseline(inputs)  # gathers the contiguous cache into inputs["_sdpa_kv"]
        timed = {"tuned " + json.dumps(cfg): fam.timed_call(inputs, cfg), "sdpa": lambda: fam.baseline(inputs)}
        outs = {}
        for mode, name in enumerate(("paged", "arith", "contig")):
            for tile, warps, stages in ((128, 4, 2), (64, 4, 2), (64, 4, 3), (64, 2, 3)):
                key = f"T{tile} w{warps} {stages}st"
                timed[f"{name} {key}"], outs[name, key] = _probe(inputs, mode, tile, warps, stages)
        rows += time_each(fam, shape, args.dtype, meta, timed, gpu)
        # The paged and contiguous probes read the same keys and values: their outputs agree.
        for (name, key), out in outs.items():
            if name == "paged" and not torch.allclose(out, outs["contig", key], rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"probe {key}: paged and contiguous outputs differ")
        if gpu:
            per = summarize(timeline(fam, inputs, args.dtype, cfg, args.launches))
            frames.append(per.reset_index().assign(**meta, **shape))
            print(f"B{shape['batch']} L{shape['context_len']} timeline (us, median over launches):\n"
                  f"{per.median().to_string()}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(Path(args.out) / "probe.csv", index=False)
    if frames:
        pd.concat(frames).to_csv(Path(args.out) / "timeline_summary.csv", index=False, float_format="%.3f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
