"""Fused families (rmsnorm, norm_gemv, rope, silu_mul, silu_gemv, kv_store): what the generic harness
does not cover.

The rope cache against transformers' rope init functions and rotary embedding, rope against
transformers' apply_rotary_pos_emb, the fused residual output, in-place and strided operands,
skipped (negative) KV slots, bad input, the emitted source's specialisation, and compilation of
the variants for a Hopper GPU (on a machine without one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels  # noqa: F401  (selects the backend before anything imports triton)
from kernels import kv_store as kvs
from kernels import norm_gemv as ng
from kernels import rmsnorm as rms
from kernels import rope as rp
from kernels import silu_gemv as sg
from kernels import silu_mul as sm
from kernels.family import rel_error

HF_LLAMA3 = dict(rp.LLAMA3_SCALING)


def _randn(*shape: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# --- rope: the cos/sin cache ----------------------------------------------------------------------
def _hf_rotary(scaling: dict | None, head_dim: int = 64, theta: float = 500000.0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072, rope_parameters=params)
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, HF_LLAMA3,
                                     {**HF_LLAMA3, "factor": 8.0, "original_max_position_embeddings": 2048}],
                         ids=["default", "linear", "llama3", "llama3-8x-2k"])
def test_rope_cache_equals_transformers(scaling) -> None:
    emb = _hf_rotary(scaling)
    assert torch.equal(rp.rope_inv_freq(64, 500000.0, scaling), emb.inv_freq)
    positions = torch.arange(0, 9000, 7)
    cos, sin = emb(torch.zeros(1), positions[None])  # [1, P, 64], both halves equal
    cache = rp.rope_cache(64, 9000, 500000.0, scaling)[positions]
    assert torch.equal(cache[:, :32], cos[0, :, :32]) and torch.equal(cache[:, 32:], sin[0, :, :32])


def test_llama3_scaling_regimes_in_float64() -> None:
    """Independent of transformers: long wavelengths divided by factor, short ones kept, smooth between."""
    factor, low, high, ctx = 8.0, 1.0, 4.0, 8192
    scaling = {"type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": ctx}
    base = 1.0 / 10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    got = rp.rope_inv_freq(128, 10000.0, scaling).double()
    wavelen = 2 * torch.pi / base
    short, long_ = wavelen < ctx / high, wavelen > ctx / low
    assert short.any() and long_.any() and (~short & ~long_).any()
    torch.testing.assert_close(got[short], base[short], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[long_], base[long_] / factor, rtol=1e-6, atol=0)
    mid = ~short & ~long_
    assert ((got[mid] < base[mid]) & (got[mid] > base[mid] / factor)).all()
    linear = rp.rope_inv_freq(128, 10000.0, {"rope_type": "linear", "factor": 2.0}).double()
    torch.testing.assert_close(linear, base / 2, rtol=1e-6, atol=0)
    cache = rp.rope_cache(128, 50, 10000.0).double()
    angles = torch.arange(50, dtype=torch.float64)[:, None] * base[None, :]
    torch.testing.assert_close(cache, torch.cat([angles.cos(), angles.sin()], -1), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "args,match",
    [
        ((63, 16, 10000.0), "even"),
        ((64, 0, 10000.0), "max_positions"),
        ((64, 16, -1.0), "theta"),
        ((64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0}), "yarn"),
        ((64, 16, 10000.0, {"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        ((64, 16, 10000.0, {"rope_type": "linear"}), "factor"),
    ],
)
def test_rope_cache_bad_input(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        rp.rope_cache(*args)


# --- rope: the kernel -----------------------------------------------------------------------------
def test_rope_matches_transformers_in_place_on_fused_qkv(device) -> None:
    """q and k as views of a fused QKV output, rotated in place; v untouched; HF's result."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    T, Hq, Hkv, D = 6, 4, 2, 32
    qkv = _randn(T, (Hq + 2 * Hkv) * D, dtype=torch.float32, device=device, seed=1)
    before = qkv.clone()
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
    positions = torch.tensor([0, 5, 17, 300, 4095, 2], dtype=torch.int32, device=device)
    emb = _hf_rotary(HF_LLAMA3, head_dim=D)
    cache = rp.rope_cache(D, 4096, 500000.0, HF_LLAMA3, device=device)
    q_out, k_out = rp.rope(q, k, positions, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    cos, sin = emb(torch.zeros(1), positions.long().cpu()[None])
    q_ref, k_ref = apply_rotary_pos_emb(before[:, : Hq * D].view(1, T, Hq, D).transpose(1, 2).cpu(),
                                        before[:, Hq * D: (Hq + Hkv) * D].view(1, T, Hkv, D).transpose(1, 2).cpu(),
                                        cos, sin)
    torch.testing.assert_close(q.cpu(), q_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.cpu(), k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], before[:, (Hq + Hkv) * D:])  # v
    assert torch.equal(qkv[0, : (Hq + Hkv) * D], before[0, : (Hq + Hkv) * D])  # position 0: identity


def test_rope_half_precision_cache_and_every_head_block(dtype, device) -> None:
    dt = getattr(torch, dtype)
    shape = {"tokens": 3, "heads_q": 6, "heads_kv": 3, "head_dim": 24}
    q0 = _randn(3, 6, 24, dtype=dt, device=device, seed=2)
    k0 = _randn(3, 3, 24, dtype=dt, device=device, seed=3)
    positions = torch.tensor([1, 100, 40], device=device)
    cache = rp.rope_cache(24, 128, 10000.0, device=device, dtype=dt)
    ref_q, ref_k = rp.rope_torch(q0.double(), k0.double(), cache[positions].double())
    for head_block in rp.FAMILY.space(shape, dtype)["HEAD_BLOCK"]:
        cfg = {"HEAD_BLOCK": head_block, "BLOCK_T": 2, "num_warps": 1}
        if rp.FAMILY.reject(shape, dtype, cfg):
            continue
        q, k = q0.clone(), k0.clone()
        rp.rope(q, k, positions, cache, config=cfg)
        err = rel_error(torch.cat([q, k], 1), torch.cat([ref_q, ref_k], 1))
        assert err <= rp.FAMILY.tolerance(dtype, device), (cfg, err)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(q=torch.randn(4, 2, 15), k=torch.randn(4, 1, 15)), ValueError, "even"),
        (dict(k=torch.randn(4, 1, 8)), ValueError, "k must be"),
        (dict(k=torch.randn(3, 1, 16)), ValueError, "k must be"),
        (dict(k=torch.randn(4, 1, 16, dtype=torch.float16)), TypeError, "k has dtype"),
        (dict(positions=torch.tensor([0, 1, 2, 64])), ValueError, "positions span"),
        (dict(positions=torch.tensor([0, -1, 2, 3])), ValueError, "positions span"),
        (dict(positions=torch.zeros(4)), TypeError, "positions"),
        (dict(positions=torch.zeros(5, dtype=torch.long)), ValueError, "positions"),
        (dict(cos_sin_cache=torch.randn(64, 8)), ValueError, "cos_sin_cache"),
        (dict(cos_sin_cache=torch.randn(64, 16, dtype=torch.float64)), TypeError, "cos_sin_cache"),
        (dict(q=torch.randn(4, 2, 32)[:, :, ::2]), ValueError, "contiguous last dim"),
        (dict(q=torch.randn(4, 32)), ValueError, "3-D"),
        (dict(q=[1.0]), TypeError, "torch.Tensor"),
    ],
)
def test_rope_bad_input(change, err, match) -> None:
    args = dict(q=torch.randn(4, 2, 16), k=torch.randn(4, 1, 16), positions=torch.arange(4),
                cos_sin_cache=rp.rope_cache(16, 64, 10000.0))
    args.update(change)
    with pytest.raises(err, match=match):
        rp.rope(args["q"], args["k"], args["positions"], args["cos_sin_cache"])


def test_rope_with_the_fused_store_equals_rope_then_kv_store(dtype, device) -> None:
    """q, k, v views of a fused QKV output; one layer of a 3-layer cache; int32 slots with padding:
    the same rotated q and k as rope alone, the same caches as kv_store after it, bit for bit."""
    dt = getattr(torch, dtype)
    L, N, B, Hq, H, D, T = 3, 4, 4, 6, 3, 24, 6
    qkv = _randn(T, (Hq + 2 * H) * D, dtype=dt, device=device, seed=12)
    caches = _randn(2, L, N, B, H, D, dtype=dt, device=device, seed=13)
    positions = torch.tensor([3, 0, 77, 9, 120, 5], device=device)
    slots = torch.tensor([13, 0, -1, 7, 15, -1], dtype=torch.int32, device=device)
    cache = rp.rope_cache(D, 128, 10000.0, device=device)

    def views(qkv):
        return (qkv[:, : Hq * D].view(T, Hq, D), qkv[:, Hq * D: (Hq + H) * D].view(T, H, D),
                qkv[:, (Hq + H) * D:].view(T, H, D))

    want_qkv, want_caches = qkv.clone(), caches.clone()
    q, k, v = views(want_qkv)
    rp.rope(q, k, positions, cache)
    kvs.kv_store(k, v, want_caches[0, 1], want_caches[1, 1], slots)
    shape = {"tokens": T, "heads_q": Hq, "heads_kv": H, "head_dim": D, "block_size": B}
    for cfg in [None, {"HEAD_BLOCK": 2, "BLOCK_T": 4, "num_warps": 1}]:
        assert cfg is None or rp.FAMILY.reject(shape, dtype, cfg) is None
        got_qkv, got_caches = qkv.clone(), caches.clone()
        q, k, v = views(got_qkv)
        rp.rope(q, k, positions, cache, config=cfg, v=v, k_cache=got_caches[0, 1], v_cache=got_caches[1, 1],
                slot_mapping=slots)
        assert torch.equal(got_qkv, want_qkv) and torch.equal(got_caches, want_caches), cfg


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(v=None), ValueError, "needs v, k_cache, v_cache and slot_mapping"),
        (dict(slot_mapping=torch.tensor([0, 1, 2, 32])), ValueError, "slot 32 is past"),
        (dict(v=torch.randn(4, 1, 8)), ValueError, "v must be"),
        (dict(k_cache=torch.randn(4, 8, 2, 16)), ValueError, "k_cache must be"),
        (dict(v_cache=torch.randn(4, 8, 1, 16, dtype=torch.float16)), TypeError, "v_cache has dtype"),
        (dict(v_cache=torch.randn(4, 1, 8, 16).transpose(1, 2)), ValueError, "same strides"),
    ],
)
def test_rope_fused_store_bad_input(change, err, match) -> None:
    args = dict(v=torch.randn(4, 1, 16), k_cache=torch.randn(4, 8, 1, 16), v_cache=torch.randn(4, 8, 1, 16),
                slot_mapping=torch.tensor([0, 9, -1, 3]))
    args.update(change)
    with pytest.raises(err, match=match):
        rp.rope(torch.randn(4, 2, 16), torch.randn(4, 1, 16), torch.arange(4), rp.rope_cache(16, 64, 10000.0),
                **args)


# --- rmsnorm --------------------------------------------------------------------------------------
def _rms_configs(hidden: int, dtype: str) -> list[dict]:
    """The default (row) config and one of the chunked variant."""
    shape = {"tokens": 1, "hidden": hidden, "residual": True}
    chunked = next(c for c in rms.FAMILY.configs(shape, dtype) if c["variant"] == "chunked")
    return [rms.FAMILY.default_config(shape, dtype), chunked]


def test_rmsnorm_residual_output_and_in_place(dtype, device) -> None:
    dt = getattr(torch, dtype)
    T, H = 9, 300
    x0 = _randn(T, H, dtype=dt, device=device, seed=4)
    r0 = _randn(T, H, dtype=dt, device=device, seed=5)
    w = _randn(H, dtype=dt, device=device, seed=6)
    h = x0.double() + r0.double()
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    tol = rms.FAMILY.tolerance(dtype, device)
    for cfg in _rms_configs(H, dtype):
        out, new_res = rms.rmsnorm(x0, w, 1e-6, residual=r0, config=cfg)
        assert torch.equal(new_res, x0 + r0)  # x + residual rounded once, as PyTorch adds
        assert rel_error(out, ref) <= tol
        x, r = x0.clone(), r0.clone()
        got = rms.rmsnorm(x, w, 1e-6, residual=r, config=cfg, out=x, residual_out=r)
        assert got[0] is x and got[1] is r  # in place, as a serving engine calls it
        assert torch.equal(x, out) and torch.equal(r, new_res)
        plain = x0.clone()
        rms.rmsnorm(plain, w, 1e-6, config=cfg, out=plain)
        assert rel_error(plain, x0.double() * torch.rsqrt(x0.double().pow(2).mean(-1, keepdim=True) + 1e-6)
                         * w.double()) <= tol


def test_rmsnorm_strided_rows_match_transformers(device) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    wide = _randn(7, 100, dtype=torch.float32, device=device, seed=7)
    x = wide[:, 10:74]  # rows 100 apart
    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(_randn(64, dtype=torch.float32, device="cpu", seed=8))
    out = rms.rmsnorm(x, norm.weight.detach().to(device), 1e-5)
    torch.testing.assert_close(out.cpu(), norm(x.cpu()).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(weight=torch.randn(7)), ValueError, "weight must be"),
        (dict(weight=torch.randn(8, dtype=torch.float16)), TypeError, "weight has dtype"),
        (dict(x=torch.randn(8)), ValueError, "2-D"),
        (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x has dtype"),
        (dict(residual=torch.randn(4, 9)), ValueError, "residual must be"),
        (dict(residual=torch.randn(4, 8, dtype=torch.float16)), TypeError, "residual has dtype"),
        (dict(residual_out=torch.randn(4, 8)), ValueError, "residual_out is given but residual is not"),
        (dict(out=torch.randn(3, 8)), ValueError, "out must be"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(x=torch.randn(8, 4).t()), ValueError, "contiguous last dim"),
        (dict(config={"variant": "row"}), ValueError, "lacks key"),
    ],
)
def test_rmsnorm_bad_input(change, err, match) -> None:
    args = dict(x=torch.randn(4, 8), weight=torch.randn(8), eps=1e-5)
    args.update(change)
    x, weight, eps = args.pop("x"), args.pop("weight"), args.pop("eps")
    with pytest.raises(err, match=match):
        rms.rmsnorm(x, weight, eps, **args)


# --- norm_gemv ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_norm_gemv_equals_the_unfused_pair_and_writes_the_residual_stream(rows, dtype, device) -> None:
    """One kernel against the engine's unfused operators (TorchOps: RMSNorm with float32 statistics,
    then F.linear) and the float64 reference: strided rows of x, a K no tile divides, N no column
    tile divides; the new residual is x + residual rounded to the dtype, and x and residual are
    left as they were."""
    from engine.ops.torch_ops import TorchOps

    dt = getattr(torch, dtype)
    K, N = 200, 37
    x = _randn(rows, 2 * K, dtype=dt, device=device, seed=rows)[:, :K]  # rows of stride 2K
    base = _randn(rows, K + 8, dtype=dt, device=device, seed=rows + 10)
    residual = base[:, :K]  # rows of stride K + 8
    norm_w = (1 + 0.5 * _randn(K, dtype=torch.float32, device=device, seed=3)).to(dt)
    weight = (_randn(N, K, dtype=torch.float32, device=device, seed=4) / K**0.5).to(dt)
    x_before, res_before = x.clone(), residual.clone()
    new_res = torch.full((rows, K), float("nan"), dtype=dt, device=device)
    out = torch.full((rows, N), float("nan"), dtype=dt, device=device)
    ng.norm_gemv(x, norm_w, 1e-5, weight, residual=residual, out=out, residual_out=new_res)
    ref_out, ref_res = TorchOps().norm_linear(x, norm_w, 1e-5, residual, weight)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)  # the same rounding of x + residual
    h = x.double() + residual.double()
    exact = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double()) @ weight.double().t()
    tol = ng.FAMILY.tolerance(dtype, device)
    assert rel_error(out, exact) <= tol and rel_error(ref_out, exact) <= 4 * tol
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)
    plain = ng.norm_gemv(x, norm_w, 1e-5, weight)  # no residual: the norm of x itself
    hx = x.double()
    assert rel_error(plain, (hx * torch.rsqrt(hx.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double())
                     @ weight.double().t()) <= tol


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(x=torch.randn(5, 8)), ValueError, "at most 4"),
        (dict(x=torch.randn(2, 8, dtype=torch.float16)), TypeError, "norm_w has dtype"),
        (dict(norm_w=torch.randn(7)), ValueError, "norm_w must be"),
        (dict(weight=torch.randn(6, 9)), ValueError, "weight must be"),
        (dict(residual=torch.randn(2, 8)), ValueError, "residual_out .* must be given"),
        (dict(residual=torch.randn(2, 9), residual_out=torch.randn(2, 8)), ValueError, "residual must be"),
        ("alias", ValueError, "shares memory with residual"),
        (dict(out=torch.randn(2, 5)), ValueError, "out must be"),
        (dict(weight=torch.randn(8, 6).t()), ValueError, "contiguous last dim"),
        (dict(config={"BLOCK_N": 8}), ValueError, "lacks key"),
        (dict(ids=torch.tensor([0, 1])), ValueError, "with ids, residual_out"),
        (dict(ids=torch.tensor([0, 1]), residual=torch.randn(2, 8), residual_out=torch.randn(2, 8)), ValueError,
         "take no residual"),
        (dict(ids=torch.tensor([0, 2]), residual_out=torch.randn(2, 8)), ValueError, "must index the table's 2 rows"),
        (dict(ids=torch.tensor([0.0, 1.0]), residual_out=torch.randn(2, 8)), TypeError, "ids"),
    ],
)
def test_norm_gemv_bad_input(change, err, match) -> None:
    args = dict(x=torch.randn(2, 8), norm_w=torch.randn(8), weight=torch.randn(6, 8))
    if change == "alias":
        residual = torch.randn(2, 8)
        change = dict(residual=residual, residual_out=residual)
    args.update(change)
    x, norm_w, weight = args.pop("x"), args.pop("norm_w"), args.pop("weight")
    with pytest.raises(err, match=match):
        ng.norm_gemv(x, norm_w, 1e-5, weight, **args)


def test_norm_gemv_gathers_embedding_rows_as_the_engine_looks_them_up(dtype, device) -> None:
    """ids (a repeated one among them) pick rows of an embedding table: the same output and residual
    stream as the engine's unfused path (the lookup, then TorchOps' norm and linear), the table left
    as it was."""
    from engine.ops.torch_ops import TorchOps

    dt = getattr(torch, dtype)
    V, K, N = 50, 96, 40
    table = _randn(V, K, dtype=dt, device=device, seed=7)
    norm_w = (1 + 0.5 * _randn(K, dtype=torch.float32, device=device, seed=8)).to(dt)
    weight = (_randn(N, K, dtype=torch.float32, device=device, seed=9) / K**0.5).to(dt)
    ids = torch.tensor([7, 49, 7], device=device)
    before = table.clone()
    rows = torch.full((3, K), float("nan"), dtype=dt, device=device)
    out = ng.norm_gemv(table, norm_w, 1e-5, weight, ids=ids, residual_out=rows)
    ref_out, ref_res = TorchOps().embed_norm_linear(ids, table, norm_w, 1e-5, weight)
    assert torch.equal(rows, ref_res) and torch.equal(table, before)
    assert rel_error(out, ref_out) <= 4 * ng.FAMILY.tolerance(dtype, device)


# --- silu_gemv ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_silu_gemv_equals_the_unfused_pair(rows, dtype, device) -> None:
    """One kernel against the engine's unfused operators (silu_mul rounded to the dtype, then
    F.linear) and the float64 reference, with strided rows, a K no tile divides and N no column
    tile divides; the input is left as it was."""
    from engine.ops.torch_ops import TorchOps

    dt = getattr(torch, dtype)
    K, N = 200, 37
    gate_up = (2 * _randn(rows, 2 * K + 16, dtype=torch.float32, device=device, seed=rows)).to(dt)[:, : 2 * K]
    weight = (_randn(N, K, dtype=torch.float32, device=device, seed=5) / K**0.5).to(dt)
    before = gate_up.clone()
    out = torch.full((rows, N), float("nan"), dtype=dt, device=device)
    sg.silu_gemv(gate_up, weight, out=out)
    gate, up = gate_up.double().chunk(2, dim=-1)
    exact = (gate * torch.sigmoid(gate) * up) @ weight.double().t()
    tol = sg.FAMILY.tolerance(dtype, device)
    assert rel_error(out, exact) <= tol
    assert rel_error(out, TorchOps().silu_linear(gate_up, weight).double()) <= tol
    assert torch.equal(gate_up, before)


@pytest.mark.parametrize(
    "gate_up,weight,kwargs,err,match",
    [
        (torch.randn(5, 16), torch.randn(6, 8), {}, ValueError, "at most 4"),
        (torch.randn(2, 15), torch.randn(6, 8), {}, ValueError, r"gate_up must be \[M, 2K\]"),
        (torch.randn(2, 16), torch.randn(6, 8, dtype=torch.float16), {}, TypeError, "weight has dtype"),
        (torch.randn(2, 16), torch.randn(6, 8), {"out": torch.randn(2, 5)}, ValueError, "out must be"),
        (torch.randn(16, 2).t(), torch.randn(6, 8), {}, ValueError, "contiguous last dim"),
        (torch.randn(2, 16), torch.randn(6, 8), {"config": {"BLOCK_N": 8}}, ValueError, "lacks key"),
    ],
)
def test_silu_gemv_bad_input(gate_up, weight, kwargs, err, match) -> None:
    with pytest.raises(err, match=match):
        sg.silu_gemv(gate_up, weight, **kwargs)


# --- silu_mul -------------------------------------------------------------------------------------
def test_silu_mul_strided_rows(dtype, device) -> None:
    dt = getattr(torch, dtype)
    wide = _randn(6, 2 * 77 + 9, dtype=dt, device=device, seed=9)
    gate_up = wide[:, 3: 3 + 2 * 77]  # rows 163 apart
    out = sm.silu_mul(gate_up)
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert rel_error(out, torch.nn.functional.silu(gate) * up) <= sm.FAMILY.tolerance(dtype, device)


@pytest.mark.parametrize(
    "gate_up,kwargs,err,match",
    [
        (torch.randn(4, 9), {}, ValueError, "even"),
        (torch.randn(8), {}, ValueError, "2-D"),
        (torch.ones(4, 8, dtype=torch.int64), {}, TypeError, "gate_up has dtype"),
        (torch.randn(4, 8), {"out": torch.empty(4, 8)}, ValueError, "out must be"),
        (torch.randn(4, 8), {"out": torch.empty(4, 4, dtype=torch.float16)}, TypeError, "out has dtype"),
        (torch.randn(4, 8), {"config": "fast"}, TypeError, "config"),
    ],
)
def test_silu_mul_bad_input(gate_up, kwargs, err, match) -> None:
    with pytest.raises(err, match=match):
        sm.silu_mul(gate_up, **kwargs)


# --- kv_store -------------------------------------------------------------------------------------
def test_kv_store_skips_negative_slots_and_touches_nothing_else(dtype, device) -> None:
    """Layer 1 of a 3-layer cache, k and v as views of a fused QKV output, int32 slots with padding."""
    dt = getattr(torch, dtype)
    L, N, B, Hq, H, D = 3, 4, 4, 4, 2, 16
    T = 6
    caches = _randn(2, L, N, B, H, D, dtype=dt, device=device, seed=10)
    before = caches.clone()
    qkv = _randn(T, (Hq + 2 * H) * D, dtype=dt, device=device, seed=11)
    k = qkv[:, Hq * D: (Hq + H) * D].view(T, H, D)
    v = qkv[:, (Hq + H) * D:].view(T, H, D)
    slots = torch.tensor([13, 0, -1, 7, 15, -1], dtype=torch.int32, device=device)
    kvs.kv_store(k, v, caches[0, 1], caches[1, 1], slots, config={"BLOCK_T": 4, "num_warps": 1})
    expect = before.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expect[0, 1, s // B, s % B] = k[t]
            expect[1, 1, s // B, s % B] = v[t]
    assert torch.equal(caches, expect)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(slot_mapping=torch.tensor([0, 1, 32])), ValueError, "slot 32 is past"),
        (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), TypeError, "slot_mapping"),
        (dict(slot_mapping=torch.tensor([0, 1])), ValueError, "slot_mapping must be"),
        (dict(v=torch.randn(3, 2, 8)), ValueError, "v must be"),
        (dict(v=torch.randn(3, 2, 16, dtype=torch.float16)), TypeError, "v has dtype"),
        (dict(k_cache=torch.randn(4, 8, 2, 8)), ValueError, "k_cache must be"),
        (dict(v_cache=torch.randn(3, 8, 2, 16)), ValueError, "v_cache must be"),
        (dict(k_cache=torch.randn(4, 8, 2, 32)[..., ::2]), ValueError, "contiguous last dim"),
        (dict(k=torch.randn(3, 32)), ValueError, "3-D"),
    ],
)
def test_kv_store_bad_input(change, err, match) -> None:
    args = dict(k=torch.randn(3, 2, 16), v=torch.randn(3, 2, 16), k_cache=torch.randn(4, 8, 2, 16),
                v_cache=torch.randn(4, 8, 2, 16), slot_mapping=torch.tensor([0, 9, -1]))
    args.update(change)
    with pytest.raises(err, match=match):
        kvs.kv_store(**args)


# --- timing hook ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rope", "kv_store", "rmsnorm", "silu_mul", "norm_gemv"])
def test_timed_call_launches_only_the_kernel(name, device) -> None:
    """timed_call works on ``out`` in place without run()'s copy-in (or norm_gemv's joining of its two
    outputs) and leaves the inputs alone."""
    fam = kernels.get_family(name)
    shape = fam.tiny_shapes()[0 if name == "norm_gemv" else 1]
    inputs = fam.make_inputs(shape, "float32", device, seed=3)
    ref = fam.reference(inputs)
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "out"}
    fam.run(inputs, None)  # fills out (for in-place ops: the copy-in and one launch)
    if name == "rope":  # undo the launch: out holds q and k again, as before a timed call
        inputs["out"].copy_(torch.cat([inputs["q"], inputs["k"]], 1))
    elif name == "kv_store":
        inputs["out"].copy_(torch.stack([inputs["k_cache"], inputs["v_cache"]]))
    elif name == "norm_gemv":  # C and the new residual stream
        for t in inputs["out"]:
            t.fill_(float("nan"))
    else:
        inputs["out"].fill_(float("nan"))
    fam.timed_call(inputs, None)()
    got = torch.cat(inputs["out"], dim=1) if name == "norm_gemv" else inputs["out"]
    assert rel_error(got, ref) <= fam.tolerance("float32", device)
    assert all(torch.equal(inputs[k], v) for k, v in before.items())


# --- specialisation, defaults, GPU compilation ---------------------------------------------------
def test_emitted_source_is_specialised() -> None:
    fam = rms.FAMILY
    row = {"variant": "row", "BLOCK_H": 2048, "ROWS": 1, "num_warps": 4}
    even = fam.emit({"tokens": 1, "hidden": 2048, "residual": False}, "float16", row)
    fused = fam.emit({"tokens": 1, "hidden": 2000, "residual": True}, "float16", row)
    assert "cols[None, :] < HIDDEN" not in even and "res_ptr" not in even and "HIDDEN = tl.constexpr(2048)" in even
    assert "cols[None, :] < HIDDEN" in fused and "res_out_ptr" in fused and "debug_barrier" not in fused
    chunked = {"variant": "chunked", "BLOCK_H": 512, "ROWS": 1, "num_warps": 4}
    assert "debug_barrier" in fam.emit({"tokens": 1, "hidden": 2048, "residual": True}, "float16", chunked)
    rope_src = rp.FAMILY.emit({"tokens": 1, "heads_q": 32, "heads_kv": 8, "head_dim": 64}, "float16",
                              {"HEAD_BLOCK": 8, "BLOCK_T": 1, "num_warps": 1})
    assert "n_heads)" not in rope_src and "dims < HALF" not in rope_src and "Q_GROUPS = tl.constexpr(4)" in rope_src


def test_default_configs_valid_for_llama_shapes() -> None:
    for dtype in ("float16", "bfloat16", "float32"):
        for T in (1, 7, 4096):
            for H in (64, 576, 2048, 4096, 8192, 16384):
                shape = {"tokens": T, "hidden": H, "residual": True}
                assert rms.FAMILY.reject(shape, dtype, rms.FAMILY.default_config(shape, dtype)) is None
                shape = {"tokens": T, "intermediate": H}
                assert sm.FAMILY.reject(shape, dtype, sm.FAMILY.default_config(shape, dtype)) is None
                for N in (2048, 3072, 16384, 128256):
                    shape = {"M": min(T, 4), "N": N, "K": H, "residual": True}
                    assert ng.FAMILY.reject(shape, dtype, ng.FAMILY.default_config(shape, dtype)) is None
                    shape = {"M": min(T, 4), "N": N, "K": H}
                    assert sg.FAMILY.reject(shape, dtype, sg.FAMILY.default_config(shape, dtype)) is None
            for Hq, Hkv, D in ((32, 8, 64), (32, 8, 128), (64, 8, 128), (9, 3, 80), (1, 1, 256)):
                shape = {"tokens": T, "heads_q": Hq, "heads_kv": Hkv, "head_dim": D}
                assert rp.FAMILY.reject(shape, dtype, rp.FAMILY.default_config(shape, dtype)) is None
                shape = {"tokens": T, "heads_kv": Hkv, "head_dim": D, "block_size": 16, "num_blocks": 512}
                assert kvs.FAMILY.reject(shape, dtype, kvs.FAMILY.default_config(shape, dtype)) is None


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, random, sys
    import kernels
    from kernels import gpu_compile
    cases = json.loads(sys.argv[1])
    for name, shape, dtype in cases:
        fam = kernels.get_family(name)
        configs = fam.configs(shape, dtype)
        picked = [fam.default_config(shape, dtype), random.Random(0).choice(configs)]
        for cfg in picked:
            gpu_compile.check(fam, shape, dtype, cfg, arch=90)
    print("compiled", len(cases))
""")


def test_variants_compile_for_hopper(tmp_path) -> None:
    """Triton's NVIDIA backend accepts every family's default and a random config (no GPU needed)."""
    cases = [[name, shape, "bfloat16"] for name in ("rmsnorm", "norm_gemv", "rope", "silu_mul", "silu_gemv", "kv_store")
             for shape in kernels.get_family(name).tiny_shapes()]
    cases += [["rmsnorm", {"tokens": 3, "hidden": 2048, "residual": True}, "bfloat16"],
              ["rope", {"tokens": 3, "heads_q": 32, "heads_kv": 8, "head_dim": 64}, "float16"],
              ["silu_mul", {"tokens": 3, "intermediate": 8192}, "float32"],
              ["norm_gemv", {"M": 4, "N": 16384, "K": 2048, "residual": True}, "bfloat16"],
              ["silu_gemv", {"M": 1, "N": 2048, "K": 8192}, "bfloat16"],
              ["kv_store", {"tokens": 3, "heads_kv": 8, "head_dim": 64, "block_size": 16, "num_blocks": 4}, "bfloat16"]]
    env = {**os.environ, "TRITON_INTERPRET": "0", "WORKBENCH_KERNEL_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], capture_output=True,
                         text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"compiled {len(cases)}" in run.stdout


def test_gpu_compile_rejects_what_only_the_interpreter_accepts(tmp_path) -> None:
    """A module global that is not a tl.constexpr runs under the interpreter but cannot compile."""
    bad = tmp_path / "bad_kernel.py"
    bad.write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        BLOCK = 16
        @triton.jit
        def k(x_ptr):
            tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)
    """))
    script = textwrap.dedent(f"""
        import sys, torch
        import kernels
        from kernels import gpu_compile
        sys.path.insert(0, {str(tmp_path)!r})
        import bad_kernel
        try:
            with gpu_compile.compile_only(90):
                bad_kernel.k[(1,)](torch.empty(16))
        except Exception as e:
            print("rejected:", "constexpr" in str(e))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "rejected: True" in run.stdout, run.stdout + run.stderr[-2000:]


def test_fused_suite_quick_writes_its_table(tmp_path) -> None:
    import pandas as pd

    from experiments import fused_suite

    out = tmp_path / "fused.csv"
    assert fused_suite.main(["--quick", "--no-compile", "--ops", "rmsnorm_residual,kv_store", "--cap", "1",
                             "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert {"device", "torch", "triton", "date", "copy_GBps", "GBps", "copy_frac", "rel_err", "speedup_vs_torch"} <= set(df)
    for op in ("rmsnorm_residual", "kv_store"):
        for tokens in fused_suite.TOKENS_QUICK:
            got = df[(df.op == op) & (df.tokens == tokens)]
            assert set(got.kind) == {"torch", "triton_default", "triton_best"}, (op, tokens)
            assert (got.ms > 0).all() and (got.failed == 0).all()
    assert (df[df.op == "kv_store"].rel_err == 0).all()
