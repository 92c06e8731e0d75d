"""The per-kernel breakdown of engine steps (CPU: the interpreter's times, checked for structure and
for the cost model's counts, not for speed)."""
from __future__ import annotations

import math

import pytest

import kernels
from engine import LLM
from engine.cuda_graphs import batch_buckets
from engine.profile import (OPERATORS, Step, decode_graph_timelines, plot_breakdown, profile_steps, timeline_rows,
                            timeline_summary)
from engine_checkpoints import checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    engine = LLM(checkpoint("llama3", tmp_path_factory), block_size=4, num_kv_blocks=40, max_num_seqs=2,
                 max_num_batched_tokens=16)
    engine.runner.capture_decode_graphs(batch_buckets(2), engine.max_model_len, capture=False)
    return engine


def test_breakdown_of_a_prefill_and_a_decode_step(llm, tmp_path):
    steps = [Step("prefill", 2, 8, 8), Step("decode", 2, 1, 12)]
    df = profile_steps(llm, steps, ceilings=(1.0, 10.0))
    c, layers = llm.config, llm.config.num_layers
    calls = {"rmsnorm": 2 * layers + 1, "qkv_proj": layers, "rope+kv_store": layers, "attention": layers,
             "rope+attention": layers, "o_proj": layers, "gate_up_proj": layers, "silu_mul": layers,
             "down_proj": layers, "lm_head": 1}
    for step, tokens in ((steps[0], 16), (steps[1], 2)):
        g = df[df["step"] == step.label].set_index("operator")
        # Two decode rows: each layer's norms run inside the qkv and gate/up kernels (norm_gemv) and
        # the activation inside the down projection's (silu_gemv); only the final norm is its own kernel.
        fused = step.phase == "decode"
        # rope and the KV store are one kernel (the rope family's fused store) on the Triton backend;
        # in a decode step attention is that kernel too (attention_paged's rope shape).
        unfused = ("rope+kv_store", "attention") if fused else ("rope+attention",)
        ops = [op for op in OPERATORS
               if op not in ("rope", "kv_store", *unfused) and not (fused and op == "silu_mul")]
        assert list(g.index[: len(ops)]) == ops
        want = {**calls, "rmsnorm": 1 if fused else 2 * layers + 1}
        assert g.loc[ops, "calls"].to_dict() == {op: want[op] for op in ops}
        assert {g.loc["qkv_proj", "family"], g.loc["gate_up_proj", "family"]} == {"norm_gemv" if fused else "gemm"}
        assert g.loc["down_proj", "family"] == ("silu_gemv" if fused else "gemm")
        assert g.loc["o_proj", "family"] == "gemm"
        assert (g.loc[ops, "ms"] > 0).all()
        qkv_n = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        # Fused, the norm's own arithmetic joins the projection's: 3 per element of x, 4 with the
        # residual add (every layer but the first).
        norm_flops = tokens * c.hidden_size * (3 + 4 * (layers - 1)) if fused else 0
        assert g.loc["qkv_proj", "flops"] == layers * 2 * tokens * qkv_n * c.hidden_size + norm_flops
        assert g.loc["lm_head", "flops"] == 2 * step.seqs * c.vocab_size * c.hidden_size  # last token of each sequence
        if fused:
            assert g.loc["rope+attention", "family"] == "attention_paged"
        else:
            assert g.loc["rope+kv_store", "family"] == "rope"
            assert g.loc["rope+kv_store", "bytes"] == kernels.get_family("rope").bytes(
                {"tokens": tokens, "heads_q": c.num_heads, "heads_kv": c.num_kv_heads, "head_dim": c.head_dim,
                 "block_size": 4}, g.loc["rope+kv_store", "dtype"]) * layers
        assert g.loc["kernels", "ms"] == pytest.approx(g.loc[ops, "ms"].sum())
        assert g.loc[ops, "share"].sum() == pytest.approx(1.0)
        row = g.loc["gate_up_proj"]
        roof_ms = max(row["flops"] / 1e9, row["bytes"] / 10e6)  # the ceilings given: 1 TFLOP/s, 10 GB/s
        assert row["roofline_frac"] == pytest.approx(roof_ms / row["ms"])
        assert math.isfinite(g.loc["step (eager)", "overhead_ms"])
    assert "step (graph)" in set(df.loc[df["phase"] == "decode", "operator"])
    assert "step (graph)" not in set(df.loc[df["phase"] == "prefill", "operator"])
    png = plot_breakdown(df, tmp_path / "breakdown.png")
    assert png.stat().st_size > 10_000


def test_bad_profile_steps(llm):
    with pytest.raises(ValueError, match="a decode step feeds 1 token"):
        profile_steps(llm, [Step("decode", 2, 3, 12)])
    with pytest.raises(ValueError, match="context_len <= max_model_len=160"):
        profile_steps(llm, [Step("prefill", 1, 8, 400)])
    llm.add_request([1, 2, 3])
    with pytest.raises(ValueError, match="requests are running"):
        profile_steps(llm, [Step("decode", 1, 1, 8)])
    llm.abort_all()


def test_timeline_rows_split_replays_and_measure_gaps():
    # Two replays of three kernels, given out of order, as the profiler may list them.
    c = "void at::native::c_kernel<128, 4, at::native::X<(bool)1> >(long, at::native::Y)"  # a C++ kernel's name
    events = [("b", 112.0, 115.0), ("a", 100.0, 110.0), (c, 116.0, 117.0),
              ("a", 200.0, 209.0), (c, 215.0, 217.0), ("b", 211.0, 213.0)]
    rows = timeline_rows(events, replays=2)
    assert rows["kernel"].tolist() == ["a", "b", "at::native::c_kernel"] * 2 and rows["replay"].tolist() == [0, 0, 0, 1, 1, 1]
    assert rows["start_us"].tolist() == [0.0, 12.0, 16.0, 0.0, 11.0, 15.0]
    assert rows["dur_us"].tolist() == [10.0, 3.0, 1.0, 9.0, 2.0, 2.0]
    assert math.isnan(rows["gap_us"][0]) and rows["gap_us"][1:3].tolist() == [2.0, 1.0] and rows["gap_us"][4:].tolist() == [2.0, 2.0]
    assert rows["own_us"].tolist() == rows["dur_us"].tolist()  # no overlap
    summary = timeline_summary(rows).set_index("kernel")
    assert summary.loc["a", "busy_us"] == 9.5 and summary.loc["b", "gap_us"] == 2.0 and summary.loc["at::native::c_kernel", "calls"] == 1
    assert summary.loc["graph replay", "busy_us"] == 17.0  # median span of 17 and 17
    assert summary.loc["a", "share"] == pytest.approx(9.5 / 17.0)
    with pytest.raises(ValueError, match="equal replays"):
        timeline_rows(events[:5], replays=2)


def test_timeline_gives_overlapping_kernels_only_their_own_time():
    """Programmatic dependent launch: b starts (and waits) while a runs, c while b runs; each is
    given the time after the kernels before it ended, so the times and gaps sum to the span."""
    events = [("a", 0.0, 10.0), ("b", 4.0, 13.0), ("c", 12.0, 14.0), ("d", 16.0, 17.0)]
    rows = timeline_rows(events, replays=1)
    assert rows["own_us"].tolist() == [10.0, 3.0, 1.0, 1.0]
    assert rows["gap_us"][1:].tolist() == [0.0, 0.0, 2.0]
    summary = timeline_summary(rows).set_index("kernel")
    assert summary.loc["graph replay", "busy_us"] == 17.0
    assert summary.drop("graph replay")["busy_us"].sum() + summary.drop("graph replay")["gap_us"].sum() == 17.0


@pytest.mark.gpu
def test_decode_graph_timeline_lists_every_kernel_of_the_graph(tmp_path_factory):
    """On the GPU (--gpu): the kernels of a captured decode graph, as its replays run them (the
    fused decode kernels: norms and activation inside the GEMVs, rope and the KV store inside
    attention; the greedy pick and advance at the end); prefill steps (no graph) are skipped; the
    replay's span is its kernels' own times plus the gaps."""
    engine = LLM(checkpoint("llama3", tmp_path_factory), block_size=4, num_kv_blocks=40, max_num_seqs=2,
                 max_num_batched_tokens=16)
    assert engine.uses_cuda_graphs
    summary = decode_graph_timelines(engine, [Step("decode", 2, 1, 12), Step("prefill", 2, 4, 4)]).set_index("kernel")
    assert set(summary["step"]) == {"decode 2 seqs @ 12"}
    kernels = summary.drop(index="graph replay")
    assert {"gemm_kernel", "norm_gemv_kernel", "silu_gemv_kernel", "paged_kernel", "rmsnorm_kernel",
            "greedy_advance_kernel"} <= set(kernels.index)
    assert not {"kv_store_kernel", "rope_kernel"} & set(kernels.index)
    span = summary.loc["graph replay", "busy_us"]
    assert kernels["busy_us"].sum() + kernels["gap_us"].sum() == pytest.approx(span, rel=0.02)
