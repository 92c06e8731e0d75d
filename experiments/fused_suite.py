"""Fused-op suite: rmsnorm, rope, silu_mul and kv_store at Llama-3.2-1B shapes, against PyTorch.

    python -m experiments.fused_suite                    # the GPU suite, bfloat16
    python -m experiments.fused_suite --quick            # tiny shapes, runs on the CPU interpreter

Shapes: hidden 2048, intermediate 8192, 32 query and 8 KV heads of 64, KV blocks of 16 tokens,
at 1, 32, 256 and 4096 tokens (decode batches to a long prefill chunk); rmsnorm with and without
the fused residual add. For each op and token count: every candidate (the default config and a
capped sample of ``configs()``) is checked against the float64 reference on NaN-poisoned outputs
first (a wrong one is dropped), then timed with ``triton.testing.do_bench`` (median, L2 flushed)
beside plain PyTorch eager and, for the ops where it is cheap, ``torch.compile`` of the same
PyTorch code, in this process. The ops are memory-bound: each row reports GB/s from the family's
byte count and its fraction of the device-to-device copy bandwidth measured in the same run.
Writes one CSV (a row per (op, tokens, kind)) with device, versions and date, and prints a summary.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

import kernels
from kernels import kv_store as kvs
from kernels import rmsnorm as rms
from kernels import rope as rp
from kernels import silu_mul as sm
from experiments.suite import bench, candidates, copy_bandwidth_gbps, precompile, run_meta
from kernels.device import default_device, device_facts
from kernels.family import Family, rel_error

LLAMA_1B = {"hidden": 2048, "intermediate": 8192, "heads_q": 32, "heads_kv": 8, "head_dim": 64, "block_size": 16}
TINY = {"hidden": 64, "intermediate": 96, "heads_q": 4, "heads_kv": 2, "head_dim": 16, "block_size": 4}
TOKENS = (1, 32, 256, 4096)
TOKENS_QUICK = (1, 5)
OPS = ("rmsnorm", "rmsnorm_residual", "rope", "silu_mul", "kv_store")


def op_shape(op: str, model: dict, tokens: int, max_tokens: int) -> tuple[str, dict]:
    """(family name, shape) of ``op`` at ``tokens``; the KV cache holds twice the largest step."""
    if op.startswith("rmsnorm"):
        return "rmsnorm", {"tokens": tokens, "hidden": model["hidden"], "residual": op == "rmsnorm_residual"}
    if op == "rope":
        return "rope", {"tokens": tokens, "heads_q": model["heads_q"], "heads_kv": model["heads_kv"],
                        "head_dim": model["head_dim"]}
    if op == "silu_mul":
        return "silu_mul", {"tokens": tokens, "intermediate": model["intermediate"]}
    blocks = 2 * -(-max_tokens // model["block_size"])
    return "kv_store", {"tokens": tokens, "heads_kv": model["heads_kv"], "head_dim": model["head_dim"],
                        "block_size": model["block_size"], "num_blocks": blocks}


def _rope_eager(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> None:
    """Hugging Face's rotate_half RoPE written back into q and k (what an engine without the kernel does)."""
    q_rot, k_rot = rp.rope_torch(q, k, cache[positions])
    q.copy_(q_rot)
    k.copy_(k_rot)


def torch_calls(name: str, inputs: dict, compile_: bool) -> dict[str, Callable[[], object]]:
    """Plain PyTorch eager (and torch.compile'd, where cheap) equivalents on the same inputs."""
    if name == "kv_store":
        # index_copy_ is already one kernel per cache: nothing for torch.compile to fuse.
        caches = torch.stack([inputs["k_cache"], inputs["v_cache"]])
        return {"torch": functools.partial(kvs.kv_store_torch, inputs["k"], inputs["v"], caches[0], caches[1],
                                           inputs["slot_mapping"])}
    if name == "rmsnorm":
        fn, args, kwargs = rms.rmsnorm_torch, (inputs["x"], inputs["weight"], inputs["eps"]), {"residual": inputs.get("residual")}
    elif name == "rope":
        fn, args, kwargs = _rope_eager, (inputs["q"], inputs["k"], inputs["positions"], inputs["cos_sin_cache"]), {}
    else:
        fn, args, kwargs = sm.silu_mul_torch, (inputs["gate_up"],), {}
    calls = {"torch": functools.partial(fn, *args, **kwargs)}
    if compile_:
        calls["torch_compile"] = functools.partial(torch.compile(fn, dynamic=False), *args, **kwargs)
    return calls


def check(fam: Family, inputs: dict, ref: torch.Tensor, config: dict | None) -> float:
    """rel error of one launch against the float64 reference ``ref``, with the output NaN-poisoned first."""
    inputs["out"].fill_(float("nan"))
    try:
        return rel_error(fam.run(inputs, config), ref)
    except Exception:  # a runtime failure of one candidate is a failed candidate
        return math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fused_suite", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--cap", type=int, default=24, help="sampled configs per op and token count")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="seconds of config sampling, shared equally by the (op, tokens) points")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few configs (CPU interpreter)")
    parser.add_argument("--out", help="CSV path (default results/fused_suite_<device>.csv)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(OPS)}")

    start = time.time()
    device = default_device()
    facts = device_facts(device)
    on_gpu = device.type == "cuda"
    model, tokens = (TINY, TOKENS_QUICK) if args.quick else (LLAMA_1B, TOKENS)
    # The interpreter computes bfloat16 only through float32 numpy and torch.compile needs a C++
    # toolchain on the CPU: --quick off a GPU runs float16 and eager PyTorch only.
    dtype = "float16" if args.quick and not on_gpu and args.dtype == "bfloat16" else args.dtype
    cap = min(args.cap, 3) if args.quick else args.cap
    compile_ = on_gpu and not args.no_compile
    plan = []
    for op in ops:
        for t in tokens:
            name, shape = op_shape(op, model, t, max(tokens))
            fam = kernels.get_family(name)
            plan.append((op, fam, shape, candidates(fam, shape, dtype, cap, args.seed)))
    # Configs compile per (op, config), not per token count: compile each once.
    jobs = list({(f.name, json.dumps({**s, "tokens": 1}), json.dumps(c, sort_keys=True)): (f.name, {**s, "tokens": 1}, dtype, c)
                 for _, f, s, cfgs in plan for c in cfgs}.values())
    print(f"{sum(len(c) for *_, c in plan)} candidates over {len(plan)} (op, tokens) points, "
          f"{len(jobs)} distinct variants; compiling with {args.workers if on_gpu else 1} worker(s)")
    errors = precompile(jobs, args.workers if on_gpu else 1)
    failed = {(j[0], json.dumps(j[3], sort_keys=True)) for j, e in zip(jobs, errors) if e}
    print(f"compiled in {time.time() - start:.0f}s, {len(failed)} failed")
    for err in sorted({e for e in errors if e})[:3]:
        print("  e.g.", err)
    copy_gbps = copy_bandwidth_gbps()
    meta = run_meta(facts, copy_gbps)

    rows = []
    for op, fam, shape, cfgs in plan:
        nbytes = fam.bytes(shape, dtype)
        tol = fam.tolerance(dtype, device)

        def row(kind: str, cfg: dict | None, t: tuple[float, float, float], err: float, tried: int = 1, bad: int = 0) -> dict:
            gbps = nbytes / t[0] / 1e6
            return {**meta, "op": op, "family": fam.name, "dtype": dtype, "tokens": shape["tokens"],
                    "shape": json.dumps(shape), "kind": kind, "config": json.dumps(cfg, sort_keys=True) if cfg else "",
                    "ms": t[0], "ms_p20": t[1], "ms_p80": t[2], "bytes": nbytes, "GBps": gbps,
                    "copy_frac": gbps / copy_gbps if math.isfinite(copy_gbps) else float("nan"),
                    "rel_err": err, "tried": tried, "failed": bad}

        point_end = time.time() + args.budget_s / len(plan)
        # Checked on one set of inputs, timed on another: the torch baselines of rope and kv_store
        # write theirs in place, over and over.
        check_inputs = fam.make_inputs(shape, dtype, device, seed=1)
        ref = fam.reference(check_inputs)
        base_err = rel_error(fam.baseline(check_inputs), ref)
        inputs = fam.make_inputs(shape, dtype, device, seed=2)
        for kind, fn in torch_calls(fam.name, inputs, compile_).items():
            try:
                rows.append(row(kind, None, bench(fn, args.quick), base_err))
            except Exception as e:  # torch.compile may fail on a given stack; the row says so
                print(f"  {op} {kind} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        timed, bad = [], 0
        for i, cfg in enumerate(cfgs):
            if i > 0 and time.time() > point_end:
                break  # keep the default; stop sampling when this point's share of the budget is spent
            err = math.inf if (fam.name, json.dumps(cfg, sort_keys=True)) in failed else check(fam, check_inputs, ref, cfg)
            if not err <= tol:
                bad += 1
                continue
            timed.append((bench(fam.timed_call(inputs, cfg), args.quick), cfg, err))
        default = next(((t, c, e) for t, c, e in timed if c == cfgs[0]), None)
        if default is not None:
            rows.append(row("triton_default", default[1], default[0], default[2]))
        if timed:
            t, cfg, err = min(timed, key=lambda tce: tce[0][0])
            rows.append(row("triton_best", cfg, t, err, tried=len(timed) + bad, bad=bad))
        line = "  ".join(f"{r['kind']} {r['ms'] * 1e3:8.1f} us {r['GBps']:7.1f} GB/s"
                         for r in rows if r["op"] == op and r["tokens"] == shape["tokens"])
        print(f"{op:17s} T={shape['tokens']:5d}  {line}  [{len(timed)} ok, {bad} bad]", flush=True)
        del inputs, check_inputs, ref

    df = pd.DataFrame(rows)
    if not (df["kind"] == "triton_best").any():
        raise SystemExit("no candidate ran correctly for any op; see the errors above")
    torch_ms = df[df["kind"] == "torch"].set_index(["op", "tokens"])["ms"]
    df["speedup_vs_torch"] = [torch_ms.get((o, t), math.nan) / ms for o, t, ms in zip(df["op"], df["tokens"], df["ms"])]
    out = Path(args.out or f"results/fused_suite_{facts.key}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}  "
          f"copy {copy_gbps:.0f} GB/s  {dtype}")
    summary = df.pivot_table(index=["op", "tokens"], columns="kind", values="speedup_vs_torch")
    print("speedup over PyTorch eager (ms_torch / ms):")
    print(summary.round(2).to_string())
    print(f"wrote {out} in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
