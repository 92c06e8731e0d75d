"""Per-kernel breakdown of engine steps: where a prefill step's and a decode step's time goes.

For each step (``Step``: sequences, new tokens per sequence, context length; the engine idle):
1. the step runs once with the engine's operator backend wrapped by a recorder, which keeps every
   operator call -- its operator, which projection for the GEMMs, its arguments;
2. each recorded call is replayed alone under the kernel timer: on CUDA launches captured in a CUDA
   graph with the L2 flushed before each (``autotune.timing.gpu_time``, median), on the CPU the
   wall clock of one run after a warm-up (the interpreter's time, not a kernel's). That is each
   kernel's own time, without the Python and launch gaps between kernels;
3. the whole step is timed from the host (``do_bench``), eagerly and, for decode steps the engine
   serves from a CUDA graph, as that graph's replay; ``overhead`` = step time - the kernels' sum is
   what the launches and the host cost on top of the kernels.
Each call's FLOPs and bytes come from its family's cost model (kernels/), so the table has the
achieved TFLOP/s and GB/s of each operator and, given the device's measured ceilings (peak TFLOP/s
and copy GB/s), its fraction of the roofline: max(flops / peak, bytes / bandwidth) / time.

A kernel alone is not a kernel in the step: a second, small kernel (a split-K reduction) costs
~0.1 us replayed alone but 1-2 us plus a ~0.4 us gap in the decode graph. So for decode steps
served from CUDA graphs, :func:`decode_graph_timelines` also records the graph's replays with
``torch.profiler``: each kernel's duration as the step runs it and the idle gaps between kernels.

    df = profile_steps(llm, [Step("prefill", 4, 512, 512), Step("decode", 32, 1, 512)], ceilings=(700.0, 3000.0))
    plot_breakdown(df, Path("kernel_breakdown.png"))
    decode_graph_timelines(llm, [Step("decode", 1, 1, 512)])  # CUDA: per kernel name, busy and gap us
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd
import torch

import kernels
from autotune import timing
from engine.ops.torch_ops import TorchOps
from kernels.attention import paged_shape
from kernels.family import dtype_name

if TYPE_CHECKING:
    from engine.llm import LLM

Timer = Callable[[Callable[[], Any]], float]  # fn -> milliseconds of one call
OPERATORS = ("rmsnorm", "qkv_proj", "rope", "kv_store", "rope+kv_store", "attention", "rope+attention", "o_proj",
             "gate_up_proj", "silu_mul", "down_proj", "lm_head")


@dataclass(frozen=True)
class Step:
    """A step of ``seqs`` sequences, each feeding its last ``query_len`` of ``context_len`` tokens."""

    phase: str  # "prefill" or "decode"
    seqs: int
    query_len: int
    context_len: int

    @property
    def label(self) -> str:
        if self.phase == "decode":
            return f"decode {self.seqs} seqs @ {self.context_len}"
        return f"{self.phase} {self.seqs}x{self.query_len}"


def default_timers(device: torch.device) -> tuple[Timer, Timer]:
    """(kernel timer, step timer). On CUDA: one launch replayed in a CUDA graph with L2 flushed
    (``autotune.timing.gpu_time``: the kernel's GPU time, no host launch cost) for an operator, and
    ``do_bench`` from the host for a whole step (its launch and host costs are part of what it takes).
    On the CPU: the wall clock of one run after a warm-up run, for both."""
    if device.type == "cuda":
        return (lambda fn: timing.gpu_time(fn)[0]), (lambda fn: timing.do_bench_time(fn)[0])

    def wall(fn: Callable[[], Any]) -> float:
        fn()
        return timing.cpu_time(fn, runs=1)[0]

    return wall, wall


@dataclass
class _Call:
    operator: str
    family: str
    shape: dict[str, Any]
    method: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for the model's operator backend: forwards every call and records it."""

    def __init__(self, ops: Any, weight_names: dict[int, str]) -> None:
        self.ops, self.weight_names = ops, weight_names
        self.calls: list[_Call] = []

    def _do(self, operator: str, family: str, shape: dict, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(_Call(operator, family, shape, method, args, kwargs))
        return getattr(self.ops, method)(*args, **kwargs)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        shape = {"M": x.shape[0], "N": weight.shape[0], "K": x.shape[1], "b_transposed": True}
        return self._do(self.weight_names[weight.data_ptr()], "gemm", shape, "linear", x, weight)

    def rmsnorm(self, x, weight, eps, residual=None):
        shape = {"tokens": x.shape[0], "hidden": x.shape[1], "residual": residual is not None}
        return self._do("rmsnorm", "rmsnorm", shape, "rmsnorm", x, weight, eps, residual)

    def norm_linear(self, x, norm_w, eps, residual, weight):
        # Unfused, TorchOps' composition records the norm and the projection as two calls; fused,
        # the one kernel is booked under the projection's operator (family norm_gemv).
        if not self.ops.fuses_into_gemv(x.shape[0]):
            return TorchOps.norm_linear(self, x, norm_w, eps, residual, weight)
        shape = {"M": x.shape[0], "N": weight.shape[0], "K": x.shape[1], "residual": residual is not None}
        return self._do(self.weight_names[weight.data_ptr()], "norm_gemv", shape, "norm_linear", x, norm_w, eps,
                        residual, weight)

    def embed_norm_linear(self, ids, embed, norm_w, eps, weight):
        # As norm_linear: unfused, the lookup and TorchOps' norm_linear; fused, one norm_gemv kernel
        # (its gather shape) booked under the projection.
        if not self.ops.fuses_into_gemv(ids.shape[0]):
            return TorchOps.embed_norm_linear(self, ids, embed, norm_w, eps, weight)
        shape = kernels.get_family("norm_gemv").shape_from_call(embed, norm_w, eps, weight, ids=ids)
        return self._do(self.weight_names[weight.data_ptr()], "norm_gemv", shape, "embed_norm_linear", ids, embed,
                        norm_w, eps, weight)

    def silu_linear(self, gate_up, weight):
        # As norm_linear: fused, the one kernel is booked under the down projection (family silu_gemv).
        if not self.ops.fuses_into_gemv(gate_up.shape[0]):
            return TorchOps.silu_linear(self, gate_up, weight)
        shape = {"M": gate_up.shape[0], "N": weight.shape[0], "K": weight.shape[1]}
        return self._do(self.weight_names[weight.data_ptr()], "silu_gemv", shape, "silu_linear", gate_up, weight)

    def rope(self, q, k, positions, cos_sin):
        shape = {"tokens": q.shape[0], "heads_q": q.shape[1], "heads_kv": k.shape[1], "head_dim": q.shape[2]}
        return self._do("rope", "rope", shape, "rope", q, k, positions, cos_sin)

    def rope_store(self, q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping):
        # As norm_linear: a backend keeping TorchOps' composition records two calls; one that
        # overrides it (one kernel) records one, booked as "rope+kv_store".
        if type(self.ops).rope_store is TorchOps.rope_store:
            return TorchOps.rope_store(self, q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
        shape = {"tokens": q.shape[0], "heads_q": q.shape[1], "heads_kv": k.shape[1], "head_dim": q.shape[2],
                 "block_size": k_cache.shape[1]}
        return self._do("rope+kv_store", "rope", shape, "rope_store", q, k, v, positions, cos_sin, k_cache, v_cache,
                        slot_mapping)

    def silu_mul(self, gate_up):
        shape = {"tokens": gate_up.shape[0], "intermediate": gate_up.shape[1] // 2}
        return self._do("silu_mul", "silu_mul", shape, "silu_mul", gate_up)

    def kv_store(self, k, v, k_cache, v_cache, slot_mapping):
        shape = {"tokens": k.shape[0], "heads_kv": k.shape[1], "head_dim": k.shape[2],
                 "block_size": k_cache.shape[1], "num_blocks": k_cache.shape[0]}
        return self._do("kv_store", "kv_store", shape, "kv_store", k, v, k_cache, v_cache, slot_mapping)

    def rope_attention(self, q, k, v, positions, cos_sin, k_cache, v_cache, meta, sm_scale):
        # As norm_linear: unfused, TorchOps' composition records rope_store and paged_attention; fused
        # (one kernel), the call is booked as "rope+attention" (family attention_paged, its rope shape).
        if not self.ops.fuses_rope_attention(meta.max_seqlen_q):
            return TorchOps.rope_attention(self, q, k, v, positions, cos_sin, k_cache, v_cache, meta, sm_scale)
        shape = paged_shape(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                            meta.max_seqlen_q, max_context_len=meta.max_context_len, k_new=k)
        return self._do("rope+attention", "attention_paged", shape, "rope_attention", q, k, v, positions, cos_sin,
                        k_cache, v_cache, meta, sm_scale)

    def paged_attention(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, sm_scale,
                        max_context_len=None):
        # The profiled steps give every sequence the same lengths, so the cost model's shape is exact.
        shape = paged_shape(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
                            max_context_len=max_context_len)
        return self._do("attention", "attention_paged", shape, "paged_attention", q, k_cache, v_cache, block_tables,
                        cu_seqlens_q, context_lens, max_seqlen_q, sm_scale, max_context_len)


def _weight_names(llm: LLM) -> dict[int, str]:
    w = llm.runner.model.weights
    names = {w.lm_head.data_ptr(): "lm_head"}
    for layer in w.layers:
        names.update({layer.qkv.data_ptr(): "qkv_proj", layer.o.data_ptr(): "o_proj",
                      layer.gate_up.data_ptr(): "gate_up_proj", layer.down.data_ptr(): "down_proj"})
    return names


def _rates(ms: float, flops: float, nbytes: float, ceilings: tuple[float, float] | None) -> dict[str, float]:
    ok = ms > 0
    out = {"tflops": flops / ms / 1e9 if ok else float("nan"), "gbps": nbytes / ms / 1e6 if ok else float("nan")}
    if ceilings is None:
        out["roofline_frac"] = float("nan")
    else:
        roof_ms = max(flops / (ceilings[0] * 1e9), nbytes / (ceilings[1] * 1e6))
        out["roofline_frac"] = roof_ms / ms if ok else float("nan")
    return out


def _graph_served(llm: LLM, step: Step) -> bool:
    """Whether the engine serves ``step`` from its padded decode graphs (captured ones on CUDA)."""
    graphs = llm.runner.graphs
    return step.phase == "decode" and graphs is not None and step.seqs <= graphs.max_batch


@torch.inference_mode()
def profile_step(llm: LLM, step: Step, *, timers: tuple[Timer, Timer] | None = None,
                 ceilings: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """Rows of one step: one per operator (its calls summed over the layers), then the step's totals
    (``operator`` "kernels", "step (eager)", and for a graph-served decode step "step (graph)")."""
    if llm.has_unfinished():
        raise ValueError("profile_step: requests are running; profile an idle engine (the step writes the KV cache)")
    if step.phase not in ("prefill", "decode") or (step.phase == "decode") != (step.query_len == 1):
        raise ValueError(f"profile_step: a decode step feeds 1 token per sequence, a prefill step more; got {step}")
    if not (1 <= step.query_len <= step.context_len <= llm.max_model_len and 1 <= step.seqs):
        raise ValueError(f"profile_step: need 1 <= query_len <= context_len <= max_model_len={llm.max_model_len}, "
                         f"got {step}")
    runner, model = llm.runner, llm.runner.model
    kernel_timer, step_timer = timers or default_timers(llm.device)
    ids, positions, meta = runner.dummy_inputs(step.seqs, step.query_len, step.context_len)
    recorder = _Recorder(model.ops, _weight_names(llm))
    inner, model.ops = model.ops, recorder
    try:
        hidden = model.forward(ids, positions, meta, runner.k_caches, runner.v_caches)
        model.logits(hidden[step.query_len - 1 :: step.query_len])
    finally:
        model.ops = inner
    dtype = dtype_name(llm.dtype)
    per_op: dict[str, dict[str, Any]] = {}
    for call in recorder.calls:
        fn = getattr(inner, call.method)
        ms = kernel_timer(lambda: fn(*call.args, **call.kwargs))
        fam = kernels.get_family(call.family)
        agg = per_op.setdefault(call.operator, {"family": call.family, "calls": 0, "ms": 0.0, "flops": 0.0,
                                                "bytes": 0.0, "shape": call.shape})
        agg["calls"] += 1
        agg["ms"] += ms
        agg["flops"] += fam.flops(call.shape)
        agg["bytes"] += fam.bytes(call.shape, dtype)
    base = {"step": step.label, "phase": step.phase, "seqs": step.seqs, "query_len": step.query_len,
            "context_len": step.context_len, "backend": f"{llm.kernels}/{llm.kernel_configs}", "dtype": dtype}
    order = sorted(per_op, key=lambda op: OPERATORS.index(op))
    rows = [{**base, "operator": op, **{k: v for k, v in per_op[op].items() if k != "shape"},
             "shape": str(per_op[op]["shape"]), **_rates(per_op[op]["ms"], per_op[op]["flops"], per_op[op]["bytes"], ceilings)}
            for op in order]
    total = {k: sum(per_op[op][k] for op in order) for k in ("calls", "ms", "flops", "bytes")}
    rows.append({**base, "operator": "kernels", "family": "", **total, "shape": "",
                 **_rates(total["ms"], total["flops"], total["bytes"], ceilings)})

    def whole(name: str, fn: Callable[[], Any]) -> None:
        ms = step_timer(fn)
        rows.append({**base, "operator": name, "family": "", "calls": total["calls"], "ms": ms, "flops": total["flops"],
                     "bytes": total["bytes"], "shape": "", "overhead_ms": ms - total["ms"],
                     **_rates(ms, total["flops"], total["bytes"], ceilings)})

    rows_idx = slice(step.query_len - 1, None, step.query_len)
    whole("step (eager)", lambda: model.logits(
        model.forward(ids, positions, meta, runner.k_caches, runner.v_caches)[rows_idx]))
    if _graph_served(llm, step):
        whole("step (graph)", runner.graphs.load(ids, positions, meta))
    for r in rows:
        r["share"] = r["ms"] / total["ms"] if total["ms"] > 0 else float("nan")
    return rows


def profile_steps(llm: LLM, steps: list[Step], *, timers: tuple[Timer, Timer] | None = None,
                  ceilings: tuple[float, float] | None = None) -> pd.DataFrame:
    """The breakdown table of several steps (see :func:`profile_step`)."""
    return pd.DataFrame([r for s in steps for r in profile_step(llm, s, timers=timers, ceilings=ceilings)])


def kernel_label(name: str) -> str:
    """A profiler kernel name without its return type, template and parameter lists:
    "void at::native::index_elementwise_kernel<128, 4, ...>(long, ...)" -> "at::native::index_elementwise_kernel"."""
    name = name.removeprefix("void ")
    return name[: min((i for i in (name.find("<"), name.find("(")) if i > 0), default=len(name))]


def timeline_rows(events: list[tuple[str, float, float]], replays: int) -> pd.DataFrame:
    """The kernels of ``replays`` replays of one CUDA graph, from profiler events (name, start µs,
    end µs) in any order: one row per kernel -- ``replay``, ``position`` in it, ``kernel`` (its
    :func:`kernel_label`), ``start_us`` from the replay's first kernel, ``dur_us`` (end - start),
    ``own_us`` and ``gap_us``.

    Kernels launched with programmatic dependent launch start before the one before them ends and
    wait, so durations overlap. Each kernel is therefore given only the time after every earlier
    kernel of the replay has ended: ``own_us`` = end - max(start, that end), ``gap_us`` = the idle
    time before it (0 when it started early; NaN for the first). Summed over a replay, the two
    make its span."""
    if replays < 1 or len(events) % replays:
        raise ValueError(f"timeline_rows: {len(events)} kernel events do not split into {replays} equal replays")
    per = len(events) // replays
    rows, first, done = [], 0.0, 0.0
    for i, (name, start, end) in enumerate(sorted(events, key=lambda e: e[1])):
        position = i % per
        if position == 0:
            first = done = start
        rows.append({"replay": i // per, "position": position, "kernel": kernel_label(name), "start_us": start - first,
                     "dur_us": end - start, "own_us": max(0.0, end - max(start, done)),
                     "gap_us": max(0.0, start - done) if position else float("nan")})
        done = max(done, end)
    return pd.DataFrame(rows, columns=["replay", "position", "kernel", "start_us", "dur_us", "own_us", "gap_us"])


def timeline_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per kernel name, medians over the replays of :func:`timeline_rows`: ``calls`` per replay,
    ``busy_us`` (its kernels' summed ``own_us``: the time each ran after the kernels before it had
    ended), ``gap_us`` (idle time before them) and ``share`` of the replay's span; then a
    ``graph replay`` row with the span (first start to last end)."""
    per = rows.groupby(["replay", "kernel"]).agg(calls=("own_us", "size"), busy_us=("own_us", "sum"),
                                                 gap_us=("gap_us", "sum"))
    out = per.groupby("kernel").median().sort_values("busy_us", ascending=False)
    span = float((rows["start_us"] + rows["dur_us"]).groupby(rows["replay"]).max().median())
    out["share"] = out["busy_us"] / span
    total = {"calls": int(out["calls"].sum()), "busy_us": span, "gap_us": float(out["gap_us"].sum()), "share": 1.0}
    return pd.concat([out, pd.DataFrame([total], index=pd.Index(["graph replay"], name="kernel"))]).reset_index()


def graph_timeline(fn: Callable[[], Any], *, replays: int = 5, warmup: int = 10) -> pd.DataFrame:
    """:func:`timeline_rows` of ``fn`` -- one launch of a captured CUDA graph -- recorded by
    ``torch.profiler`` (CUPTI) over ``replays`` launches after ``warmup`` ones. Unlike the kernel
    timer's replays of each call alone, this is each kernel as the step runs it: after its real
    predecessor, with the L2 as that left it, and the idle gaps between kernels."""
    if not torch.cuda.is_available():
        raise ValueError("graph_timeline: needs a CUDA GPU (the profiler records the graph's kernels there)")
    from torch.autograd import DeviceType

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn()
        torch.cuda.synchronize()
    events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return timeline_rows(events, replays)


def decode_graph_timelines(llm: LLM, steps: list[Step], *, replays: int = 5) -> pd.DataFrame:
    """:func:`timeline_summary` of each decode step of ``steps`` that the engine serves from a CUDA
    graph (the others are skipped), with the step's label: an empty table without graphs."""
    if not llm.uses_cuda_graphs:
        return pd.DataFrame()
    runner, frames = llm.runner, []
    for step in steps:
        if not _graph_served(llm, step):
            continue
        ids, positions, meta = runner.dummy_inputs(step.seqs, 1, step.context_len)
        summary = timeline_summary(graph_timeline(runner.graphs.load(ids, positions, meta), replays=replays))
        summary.insert(0, "step", step.label)
        frames.append(summary)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_breakdown(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Stacked bars: per step, each operator's kernel time (ms, summed over layers), plus the gap to
    the eager step ("launch + host overhead"); beside them, each operator's fraction of the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = df[df["operator"].isin(OPERATORS)]
    steps = list(dict.fromkeys(df["step"]))
    table = ops.pivot_table(index="step", columns="operator", values="ms", aggfunc="sum").reindex(steps)
    table = table[[op for op in OPERATORS if op in table.columns]]
    eager = df[df["operator"] == "step (eager)"].set_index("step")["overhead_ms"].reindex(steps)
    table["launch + host overhead"] = eager.clip(lower=0).fillna(0.0)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    # Each step on its own scale: a prefill step takes far longer than a decode step.
    shares = table.div(table.sum(axis=1), axis=0) * 100
    shares.plot.bar(stacked=True, ax=a1, rot=0, colormap="tab20", width=0.6)
    for i, total in enumerate(table.sum(axis=1)):
        a1.annotate(f"{total:.3g} ms", (i, 101), ha="center", fontsize=8)
    a1.set_ylabel("% of the eager step's time")
    a1.set_ylim(0, 110)
    a1.set_xlabel("")
    a1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    frac = ops.pivot_table(index="operator", columns="step", values="roofline_frac", aggfunc="first")
    frac = frac.reindex([op for op in OPERATORS if op in frac.index])[[s for s in steps if s in frac.columns]]
    if frac.notna().any().any():
        frac.plot.bar(ax=a2, rot=30)
        a2.set_ylabel("fraction of roofline (measured ceilings)")
        a2.set_ylim(0, max(1.0, float(frac.max().max()) * 1.1))
    else:
        a2.text(0.5, 0.5, "no ceilings given", ha="center", va="center", transform=a2.transAxes)
    a2.set_xlabel("")
    a2.grid(axis="y", alpha=0.3)
    for lbl in a2.get_xticklabels():
        lbl.set_ha("right")
    fig.suptitle(title or "Per-kernel breakdown")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
