"""The attention families through their direct calls: varlen prefill and paged attention.

Every case draws random inputs, poisons the output with NaN, and compares against the float64
reference (per sequence softmax attention; the paged one gathers the cache through the block
table) under the family's per-dtype tolerance; NaN or an unwritten element fails. Bad input must
raise ValueError/TypeError naming the problem.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import attention
from kernels.attention_prefill import sdpa_reference
from kernels.family import rel_error

PREFILL = kernels.get_family("attention_prefill")
PAGED = kernels.get_family("attention_paged")


def _prefill_inputs(lens, hq, hkv, d, causal, dtype, device, seed=0):
    shape = {"batch": len(lens), "seqlen": max(lens), "heads_q": hq, "heads_kv": hkv, "head_dim": d, "causal": causal}
    return shape, PREFILL.make_inputs(shape, dtype, device, seed=seed, seqlens=lens)


def _paged_inputs(q_lens, ctx, hq, hkv, d, bs, dtype, device, seed=0):
    shape = {"batch": len(ctx), "query_len": max(q_lens), "context_len": max(ctx), "heads_q": hq, "heads_kv": hkv,
             "head_dim": d, "block_size": bs}
    return shape, PAGED.make_inputs(shape, dtype, device, seed=seed, query_lens=q_lens, context_lens=ctx)


def _check(fam, inputs, config, dtype, device):
    ref = fam.reference(inputs)
    inputs["out"].fill_(float("nan"))
    out = fam.run(inputs, config)
    assert out.data_ptr() == inputs["out"].data_ptr()
    err = rel_error(out, ref)
    tol = fam.tolerance(dtype, device)
    assert err <= tol, f"{fam.name} {config}: rel error {err:.3g} > {tol:.1g}"


# --- prefill ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "group,causal,head_dim",
    [(1, True, 64), (2, False, 64), (4, True, 80), (8, False, 96), (8, True, 64)],
)
def test_prefill_varlen(group: int, causal: bool, head_dim: int, dtype: str, device: torch.device) -> None:
    # Lengths 1, odd, empty and unequal in one batch; the longest sets max_seqlen.
    shape, inputs = _prefill_inputs([1, 37, 0, 16, 5], 8, 8 // group, head_dim, causal, dtype, device)
    _check(PREFILL, inputs, None, dtype, device)


@pytest.mark.parametrize("head_dim", [160, 256])
def test_head_dims_above_128(head_dim: int, dtype: str, device: torch.device) -> None:
    """Head dims up to 256 are right at their defaults: 160 padded to 256, and 256 itself, in a causal
    varlen prefill and a mixed paged batch (decode and chunked prefill)."""
    shape, inputs = _prefill_inputs([1, 21, 8], 4, 2, head_dim, True, dtype, device, seed=head_dim)
    _check(PREFILL, inputs, None, dtype, device)
    shape, inputs = _paged_inputs([1, 5, 1], [1, 21, 40], 4, 2, head_dim, 16, dtype, device, seed=head_dim)
    _check(PAGED, inputs, None, dtype, device)


@pytest.mark.parametrize("variant,maxnreg", [("ptr", 0), ("tma", 0), ("tma", 168)])
@pytest.mark.parametrize("block_m,block_n", [(16, 64), (64, 16), (32, 32)])
def test_prefill_tiles_and_variants(variant: str, maxnreg: int, block_m: int, block_n: int, dtype: str,
                                    device: torch.device) -> None:
    """BLOCK_M < BLOCK_N is the causal trap of triton PR #8853: the diagonal block starts at the
    query block's start rounded down to a key block. Query blocks of the tma variant run past a
    sequence's end into the next one (loaded by the descriptor, never stored)."""
    shape, inputs = _prefill_inputs([70, 3, 33], 4, 2, 64, True, dtype, device, seed=1)
    config = {"variant": variant, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2,
              "maxnreg": maxnreg}
    if variant not in PREFILL.space(shape, dtype)["variant"]:
        pytest.skip("tensor descriptors need Hopper or the interpreter")
    PREFILL.check_config(shape, dtype, config)
    _check(PREFILL, inputs, config, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("variant,block_n,stages,causal,head_dim,group", [
    ("ws", 128, 2, True, 128, 1),
    ("wsp_pp", 64, 3, False, 128, 4),
    ("wsp", 64, 2, True, 64, 8),
    ("ws_pp", 128, 2, False, 64, 2),
    ("wsp_pp", 128, 2, True, 128, 2),
    ("wsp", 128, 2, True, 128, 1),
])
@pytest.mark.parametrize("kv_heads_per_section", [None, 3])
def test_prefill_warp_specialised(variant: str, block_n: int, stages: int, causal: bool, head_dim: int, group: int,
                                  kv_heads_per_section: int | None, dtype: str, device: torch.device,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gluon kernel on a Hopper GPU: a ragged batch whose lengths end inside a query half, a key
    block and a stage lap (300), fill one key block exactly (64, 128), hold one token or none; GQA
    groups 1 to 8. Query blocks run past a sequence's end into the next one (loaded, never stored).
    The persistent variants (wsp*) run 168 tiles on at most 132 programs, claiming tiles from a
    counter: some run two, with tiles past a sequence's end skipped between them. Tiles come in
    sections of heads whose keys and values fit in L2: one section at the module's size, and
    sections of 3 KV heads' query heads when L2_SECTION_BYTES holds 3 heads' keys and values (the
    last section partial: 3 * group does not divide the 56 (sequence, query head) pairs)."""
    if dtype == "float32":
        pytest.skip("the ws variants run float16 and bfloat16")
    shape, inputs = _prefill_inputs([300, 1, 129, 0, 64, 77, 128], 8, 8 // group, head_dim, causal, dtype, device, seed=2)
    config = {"variant": variant, "BLOCK_M": 128, "BLOCK_N": block_n, "num_warps": 4, "num_stages": stages, "maxnreg": 0}
    assert variant in PREFILL.space(shape, dtype)["variant"]
    PREFILL.check_config(shape, dtype, config)
    if kv_heads_per_section is not None:
        kv_bytes = 300 * head_dim * 2 * torch.finfo(getattr(torch, dtype)).bits // 8  # one KV head's K and V
        monkeypatch.setattr(PREFILL.module(shape, dtype, config), "L2_SECTION_BYTES", kv_heads_per_section * kv_bytes)
    _check(PREFILL, inputs, config, dtype, device)


_WS_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    import kernels
    from kernels import gpu_compile
    from kernels.device import KNOWN_DEVICES, assume_device
    fam = kernels.get_family("attention_prefill")
    out = []
    with assume_device(KNOWN_DEVICES["h200"]):
        for variant, d, causal in (("ws", 128, True), ("ws_pp", 64, False)):
            shape = {"batch": 2, "seqlen": 256, "heads_q": 4, "heads_kv": 2, "head_dim": d, "causal": causal}
            cfg = {"variant": variant, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "maxnreg": 0}
            [r] = gpu_compile.resources(fam, shape, "bfloat16", cfg, arch=90)
            out.append({**r, "ptx": "setmaxnreg" in gpu_compile.compile_launch(fam, shape, "bfloat16", cfg)[0].kernel.asm["ptx"]})
    print(json.dumps(out))
""")


def test_prefill_warp_specialised_compiles_for_hopper(tmp_path) -> None:
    """The Gluon variants compiled for sm_90 with an H200's facts (no GPU): 12 warps within the
    kernel-wide cap of 168 registers, redistributed by setmaxnreg, nothing spilled, and shared
    memory within an H200 SM's."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "WORKBENCH_KERNEL_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _WS_COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    for r in json.loads(run.stdout.strip().splitlines()[-1]):
        assert r["name"] == "prefill_ws_kernel" and r["registers"] <= 168 and r["spill_bytes"] == 0, r
        assert r["ptx"] and r["shared"] <= 232448, r


def test_prefill_warp_specialised_variants_only_on_a_hopper_gpu() -> None:
    """Gluon does not run in the interpreter: the ws variants are offered only on a Hopper GPU,
    for head dims 64 and 128 in 16-bit types; their fixed tile is checked."""
    from kernels.device import KNOWN_DEVICES, assume_device, interpreting

    shape = {"batch": 1, "seqlen": 512, "heads_q": 4, "heads_kv": 4, "head_dim": 128, "causal": True}
    ws = {"variant": "ws", "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "maxnreg": 0}
    if interpreting():
        assert "ws" not in PREFILL.space(shape, "float16")["variant"]
        return
    with assume_device(KNOWN_DEVICES["h200"]):
        assert {"ws", "ws_pp"} <= set(PREFILL.space(shape, "bfloat16")["variant"])
        assert "ws" not in PREFILL.space(shape, "float32")["variant"]
        assert "ws" not in PREFILL.space({**shape, "head_dim": 96}, "bfloat16")["variant"]
        PREFILL.check_config(shape, "bfloat16", ws)
        for bad, why in (({"num_warps": 8}, "two consumer warp groups"), ({"BLOCK_M": 64}, "two consumer warp groups"),
                         ({"maxnreg": 128}, "maxnreg 0"), ({"BLOCK_N": 32}, "64 or 128"),
                         ({"num_stages": 4}, "shared memory")):
            with pytest.raises(ValueError, match=why):
                PREFILL.check_config(shape, "bfloat16", {**ws, **bad})


_RESOURCES_SCRIPT = textwrap.dedent("""
    import json, sys
    import kernels
    from kernels import gpu_compile
    from kernels.device import KNOWN_DEVICES, assume_device
    fam = kernels.get_family("attention_prefill")
    shape = {"batch": 2, "seqlen": 256, "heads_q": 4, "heads_kv": 4, "head_dim": 128, "causal": True}
    tile = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    with assume_device(KNOWN_DEVICES["h200"]):
        out = {"default": fam.default_config(shape, "bfloat16"), "default_fp32": fam.default_config(shape, "float32"),
               "default_d64": fam.default_config({**shape, "head_dim": 64}, "bfloat16")}
        for name, cfg in (("capped", {"variant": "tma", **tile, "maxnreg": 128}),
                          ("tma", {"variant": "tma", **tile, "maxnreg": 0}),
                          ("ptr", {"variant": "ptr", **tile, "maxnreg": 0})):
            [out[name + "_sm90"]] = gpu_compile.resources(fam, shape, "bfloat16", cfg, arch=90)
    print(json.dumps(out))
""")


def test_prefill_on_hopper_keeps_q_in_shared_memory_and_its_default_fits_the_register_cap(tmp_path) -> None:
    """Compiled for sm_90 with an H200's facts (Triton's NVIDIA backend and ptxas, no GPU): the tma
    variant reads Q from shared memory, so its 128x64 tile on 8 warps needs far fewer registers
    than the ptr variant, which holds Q in registers; capped at 128 registers it does not spill,
    two programs' worth of registers and shared memory per SM. The defaults: the warp-specialised
    kernel at D 128 and D 64 in 16-bit types, the tma variant in float32 (capped at D 128)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "WORKBENCH_KERNEL_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _RESOURCES_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["default"] == {"variant": "wsp_pp", "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2,
                              "maxnreg": 0}
    assert got["default_fp32"]["variant"] == "tma" and got["default_fp32"]["maxnreg"] == 128
    assert got["default_d64"] == {"variant": "wsp", "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2,
                                  "maxnreg": 0}
    assert got["capped_sm90"]["registers"] <= 128 and got["capped_sm90"]["spill_bytes"] == 0
    assert 2 * got["capped_sm90"]["shared"] <= 232448  # two programs fit an H200 SM's shared memory
    assert got["tma_sm90"]["registers"] < 170 < 200 < got["ptr_sm90"]["registers"]
    assert got["tma_sm90"]["spill_bytes"] == 0


def test_prefill_strided_views_scale_and_check_values(device: torch.device) -> None:
    """q, k, v as head slices of one fused [T, Hq + 2 Hkv, D] projection; a non-default scale."""
    T, hq, hkv, d = 41, 4, 2, 64
    gen = torch.Generator(device=device).manual_seed(3)
    qkv = torch.randn(T, hq + 2 * hkv, d, generator=gen, device=device)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    cu = torch.tensor([0, 20, T], dtype=torch.int32, device=device)
    ref = torch.cat([sdpa_reference(q[a:b], k[a:b], v[a:b], torch.arange(b - a, device=device), 0.3)
                     for a, b in ((0, 20), (20, T))])
    for variant in PREFILL.space({"batch": 2, "seqlen": 21, "heads_q": hq, "heads_kv": hkv, "head_dim": d,
                                  "causal": True}, "float32")["variant"]:
        config = {"variant": variant, "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "maxnreg": 0}
        out = attention.prefill(q, k, v, cu, 21, sm_scale=0.3, config=config, check_values=False)
        assert rel_error(out, ref) <= PREFILL.tolerance("float32", device), variant


# --- paged ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
@pytest.mark.parametrize("variant,split", [("decode", 1), ("decode_split", 4)])
def test_paged_decode(block_size: int, variant: str, split: int, dtype: str, device: torch.device) -> None:
    # Contexts of 1 token, exactly whole blocks, and partial last blocks; one sequence with no new
    # token. Split-KV with 4 slices leaves the short contexts' later slices empty.
    ctx = [1, 2 * block_size, 3 * block_size + 5, 70]
    shape, inputs = _paged_inputs([1, 1, 1, 0], ctx, 8, 2, 64, block_size, dtype, device, seed=block_size)
    config = {**PAGED.default_config(shape, dtype), "variant": variant, "SPLIT": split, "TILE": 16}
    PAGED.check_config(shape, dtype, config)
    _check(PAGED, inputs, config, dtype, device)


@pytest.mark.parametrize("variant,split,tile", [("decode", 1, 32), ("decode_split", 4, 16)])
def test_paged_decode_on_one_warp(variant: str, split: int, tile: int, dtype: str, device: torch.device) -> None:
    """One warp per program (decode only): whole score rows in one warp, so the row sums are taken
    per tile (LAZY_SUM off), unlike the same config on 2 warps."""
    # Head dim 32: at 64, a float32 program's q and k tiles would not fit one warp's registers.
    shape, inputs = _paged_inputs([1, 1, 1], [1, 3 * tile + 5, 70], 8, 2, 32, 16, dtype, device, seed=tile)
    config = {**PAGED.default_config(shape, dtype), "variant": variant, "SPLIT": split, "TILE": tile,
              "num_warps": 1}
    PAGED.check_config(shape, dtype, config)
    assert not PAGED.facts(shape, dtype, config)["LAZY_SUM"]
    assert PAGED.facts(shape, dtype, {**config, "num_warps": 2})["LAZY_SUM"]
    _check(PAGED, inputs, config, dtype, device)


def _rope_inputs(ctx, bs, dtype, device, seed=0, head_dim=64):
    shape = {"batch": len(ctx), "query_len": 1, "context_len": max(ctx), "heads_q": 8, "heads_kv": 2,
             "head_dim": head_dim, "block_size": bs, "rope": True}
    return shape, PAGED.make_inputs(shape, dtype, device, seed=seed, context_lens=ctx)


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("variant,split,tile", [("decode", 1, 16), ("decode_split", 4, 16), ("decode_split", 2, 32)])
def test_paged_decode_with_fused_rope_and_store(block_size: int, variant: str, split: int, tile: int, dtype: str,
                                                device: torch.device) -> None:
    # Contexts: the first token (only the newest position), the newest alone in a new tile and in a
    # new block, the newest ending a tile, and a padding row (the last: slot -1, nothing stored).
    # The newest position's cache slot holds noise before the call; reading it fails the reference.
    ctx = [1, tile + 1, 2 * tile, 3 * block_size + 5, 70]
    shape, inputs = _rope_inputs(ctx, block_size, dtype, device, seed=block_size + split)
    config = {**PAGED.default_config(shape, dtype), "variant": variant, "SPLIT": split, "TILE": tile}
    PAGED.check_config(shape, dtype, config)
    before = {k: inputs[k].clone() for k in ("q", "k_new", "v_new", "k_cache", "v_cache")}
    k_want, v_want = PAGED.cache_reference(inputs)
    _check(PAGED, inputs, config, dtype, device)
    for name in ("q", "k_new", "v_new"):
        assert torch.equal(inputs[name], before[name]), f"{name} was modified"
    one_ulp = {"float32": 2**-23, "float16": 2**-10, "bfloat16": 2**-7}[dtype]
    for got, want, old in ((inputs["k_cache"], k_want, before["k_cache"]), (inputs["v_cache"], v_want,
                                                                              before["v_cache"])):
        written = (want != old).flatten(2).any(-1)  # [blocks, slots]: the stored positions
        assert int(written.sum()) == len(ctx) - 1  # every row but the padding one
        assert torch.equal(got[~written], old[~written])  # nothing else touched
        # Rounded once each way, from float32 here and float64 there: a few ulps of the largest value.
        want = want[written].double()
        torch.testing.assert_close(got[written].double(), want, rtol=one_ulp, atol=4 * one_ulp * float(want.abs().max()))


def test_paged_fused_rope_in_the_engine_shapes_and_its_bad_input() -> None:
    shape, i = _rope_inputs([5, 9], 8, "float32", "cpu")
    args = (i["q"], i["k_cache"], i["v_cache"], i["block_tables"], i["cu_seqlens_q"], i["context_lens"], 1)
    new_kv = {k: i[k] for k in ("k_new", "v_new", "cos_sin", "slot_mapping")}
    assert PAGED.shape_from_call(*args, max_context_len=9, **new_kv) == {**shape, "context_len": 9}
    assert "general" not in PAGED.space(shape, "float32")["variant"]
    with pytest.raises(ValueError, match="need k_new, v_new, cos_sin and slot_mapping; got only"):
        attention.paged(*args, k_new=i["k_new"], v_new=i["v_new"])
    with pytest.raises(ValueError, match="decode only"):
        attention.paged(*args[:-1], 2, **new_kv)
    with pytest.raises(ValueError, match=r"cos_sin must be \[max_pos, D=64\]"):
        attention.paged(*args, **{**new_kv, "cos_sin": i["cos_sin"][:, :32]})
    with pytest.raises(TypeError, match="cos_sin has dtype"):
        attention.paged(*args, **{**new_kv, "cos_sin": i["cos_sin"].double()})
    with pytest.raises(ValueError, match="k_new must be"):
        attention.paged(*args, **{**new_kv, "k_new": i["k_new"][:, :1], "v_new": i["v_new"][:, :1]})
    with pytest.raises(ValueError, match="slot 10000 is past"):
        attention.paged(*args, **{**new_kv, "slot_mapping": torch.tensor([0, 10_000])})
    with pytest.raises(ValueError, match="rope is fused only into decode"):
        PAGED.space({**shape, "query_len": 2}, "float32")


def test_paged_decode_split_relaunched_on_new_inputs(dtype: str, device: torch.device) -> None:
    """Three launches of one split-KV config on different inputs each give their own reference:
    nothing of a launch's workspace (the slices' partials and log-sum-exps) leaks into the next."""
    config = None
    for seed in range(3):
        shape, inputs = _paged_inputs([1, 1, 1], [70, 33, 5], 8, 2, 64, 16, dtype, device, seed=100 + seed)
        config = config or {**PAGED.default_config(shape, dtype), "variant": "decode_split", "SPLIT": 4, "TILE": 16}
        _check(PAGED, inputs, config, dtype, device)


@pytest.mark.parametrize(
    "block_size,group,head_dim,heads,block_q",
    [(16, 4, 64, 4, 4), (8, 1, 80, 1, 16), (32, 8, 64, 2, 8), (64, 2, 96, 2, 8), (16, 4, 64, 4, 16)],
)
def test_paged_mixed_batch(block_size: int, group: int, head_dim: int, heads: int, block_q: int, dtype: str,
                           device: torch.device) -> None:
    """Chunked prefill and decode tokens in one batch: query lengths 1 and above, a query that fills
    its context (prefill with no cached prefix), heads of one KV head split over programs. The last
    case has 64 rows, 16 per warp: its row sums are taken per tile, the others' after the last tile."""
    q_lens = [1, 7, 1, 19, 3]
    ctx = [45, 29, 1, 19, 70]
    shape, inputs = _paged_inputs(q_lens, ctx, 2 * group, 2, head_dim, block_size, dtype, device, seed=group)
    config = {"variant": "general", "TILE": 32, "SPLIT": 1, "HEADS": heads, "BLOCK_Q": block_q,
              "num_warps": 4, "num_stages": 2}
    PAGED.check_config(shape, dtype, config)
    assert PAGED.facts(shape, dtype, config)["LAZY_SUM"] == (heads * block_q < 64)
    _check(PAGED, inputs, config, dtype, device)


def test_paged_tile_boundaries(device: torch.device) -> None:
    """Query blocks whose first position takes every residue modulo the tile: the split between
    the unmasked keys (before the block) and the causally masked tiles is exact at each one."""
    q_lens, ctx = [20, 21, 22, 23], [40, 42, 44, 46]
    shape, inputs = _paged_inputs(q_lens, ctx, 4, 1, 32, 8, "float32", device, seed=7)
    config = {"variant": "general", "TILE": 16, "SPLIT": 1, "HEADS": 4, "BLOCK_Q": 4, "num_warps": 4, "num_stages": 2}
    PAGED.check_config(shape, "float32", config)
    _check(PAGED, inputs, config, "float32", device)


def test_paged_default_configs_and_decode_through_general(device: torch.device) -> None:
    """The defaults of a decode and a general batch, and decode run by the general variant."""
    shape, inputs = _paged_inputs([1, 1, 1], [100, 3, 64], 4, 4, 64, 16, "float32", device)
    _check(PAGED, inputs, None, "float32", device)
    general = {"variant": "general", "TILE": 64, "SPLIT": 1, "HEADS": 1, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 2}
    _check(PAGED, inputs, general, "float32", device)
    shape, inputs = PAGED.tiny_shapes()[1], None
    inputs = PAGED.make_inputs(shape, "float32", device, seed=5, ragged=True)
    _check(PAGED, inputs, None, "float32", device)
    assert PAGED.timed_call(inputs, None)() is inputs["out"]


def test_block_offsets_are_int64() -> None:
    """Block index x block stride can pass 2^31 in a large cache (vLLM PR #47671): the emitted
    kernel widens the block index before multiplying."""
    shape = PAGED.tiny_shapes()[0]
    src = PAGED.emit(shape, "float16", PAGED.default_config(shape, "float16"))
    assert "BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)" in src
    assert "blk * stride_kb" in src and "blk * stride_vb" in src


# --- protocol pieces ------------------------------------------------------------------------------
def test_shapes_buckets_and_cost() -> None:
    shape, inputs = _paged_inputs([1, 1], [37, 20], 8, 2, 64, 16, "float16", "cpu")
    args = [inputs[k] for k in ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "context_lens", "max_seqlen_q")]
    assert PAGED.shape_from_call(*args) == shape
    assert PAGED.shape_from_call(*args, max_context_len=50)["context_len"] == 50
    assert PAGED.bucket(shape) == {**shape, "batch": 2, "context_len": 64}
    assert PAGED.bucket({**shape, "query_len": 5})["query_len"] == 8
    pshape, pinputs = _prefill_inputs([9, 30], 4, 1, 80, True, "float16", "cpu")
    assert PREFILL.shape_of(pinputs) == pshape
    assert PREFILL.bucket(pshape) == {**pshape, "seqlen": 32}
    # flops count 4 D per visible (query head, query, key) pair: check against the masks' count.
    lq, lc = 5, 12
    visible = int((torch.arange(lc)[None, :] <= torch.arange(lc - lq, lc)[:, None]).sum())
    s = {**shape, "batch": 3, "query_len": lq, "context_len": lc}
    assert PAGED.flops(s) == 4 * 64 * 8 * 3 * visible
    s = {**pshape, "batch": 2, "seqlen": 7}
    assert PREFILL.flops(s) == 4 * 80 * 4 * 2 * 28
    assert PREFILL.flops({**s, "causal": False}) == 4 * 80 * 4 * 2 * 49
    # Decode reads K and V once: the bytes are dominated by 2 * B * L * Hkv * D * elt.
    d = {"batch": 4, "query_len": 1, "context_len": 1024, "heads_q": 32, "heads_kv": 8, "head_dim": 128,
         "block_size": 16}
    kv = 2 * 4 * 1024 * 8 * 128 * 2
    assert kv < PAGED.bytes(d, "bfloat16") < 1.02 * kv


def test_direct_calls_through_family_call(device: torch.device) -> None:
    _, inputs = _prefill_inputs([5, 12], 2, 1, 32, False, "float32", device)
    out = PREFILL.call(inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens"], 12, causal=False)
    assert rel_error(out, PREFILL.reference(inputs)) <= PREFILL.tolerance("float32", device)
    _, inputs = _paged_inputs([2, 1], [9, 30], 2, 1, 32, 8, "float32", device)
    args = [inputs[k] for k in ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "context_lens", "max_seqlen_q")]
    assert rel_error(PAGED.call(*args), PAGED.reference(inputs)) <= PAGED.tolerance("float32", device)


# --- bad input ------------------------------------------------------------------------------------
def _good_prefill():
    _, i = _prefill_inputs([3, 5], 4, 2, 32, True, "float32", "cpu")
    return i


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda i: i.update(k=i["k"][:, :1].repeat(1, 3, 1), v=i["v"][:, :1].repeat(1, 3, 1)), ValueError,
         "not a multiple"),
        (lambda i: i.update(k=i["k"][..., :16], v=i["v"][..., :16]), ValueError, "head dims differ"),
        (lambda i: i.update(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
        (lambda i: i.update(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "end at the token count"),
        (lambda i: i.update(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "start at 0"),
        (lambda i: i.update(cu_seqlens=i["cu_seqlens"].long()), TypeError, "cu_seqlens must be int32"),
        (lambda i: i.update(max_seqlen=4), ValueError, "max_seqlen=4 is shorter"),
        (lambda i: i.update(max_seqlen=4.0), TypeError, "max_seqlen must be an int"),
        (lambda i: i.update(q=i["q"].half()), TypeError, "share one dtype"),
        (lambda i: i.update(q=i["q"].int(), k=i["k"].int(), v=i["v"].int()), TypeError, "unsupported dtype"),
        (lambda i: i.update(cu_seqlens=i["cu_seqlens"].to("meta")), ValueError, "cu_seqlens is on meta"),
        (lambda i: i.update(k=i["k"].to("meta"), v=i["v"].to("meta")), ValueError, "k is on meta"),
        (lambda i: i.update(q=i["q"][0]), ValueError, "q must be 3-D"),
        (lambda i: i.update(k=i["k"][:7], v=i["v"][:7]), ValueError, "q has 8 tokens but k and v have 7"),
        (lambda i: i.update(out=i["out"][:, :2]), ValueError, "out must be"),
        (lambda i: i.update(q=i["q"].repeat(1, 1, 9), k=i["k"].repeat(1, 1, 9), v=i["v"].repeat(1, 1, 9)),
         ValueError, "head dim 288"),
    ],
)
def test_prefill_bad_input(change, error, match) -> None:
    i = _good_prefill()
    change(i)
    with pytest.raises(error, match=match):
        attention.prefill(i["q"], i["k"], i["v"], i["cu_seqlens"], i["max_seqlen"], out=i["out"])


def test_prefill_bad_options() -> None:
    i = _good_prefill()
    args = (i["q"], i["k"], i["v"], i["cu_seqlens"], 5)
    with pytest.raises(ValueError, match="sm_scale"):
        attention.prefill(*args, sm_scale=-1.0)
    with pytest.raises(TypeError, match="sm_scale"):
        attention.prefill(*args, sm_scale="0.1")
    with pytest.raises(TypeError, match="causal"):
        attention.prefill(*args, causal=1)
    with pytest.raises(TypeError, match="config must be a dict"):
        attention.prefill(*args, config=[1])
    with pytest.raises(ValueError, match="BLOCK_M"):
        attention.prefill(*args, config={"variant": "ptr", "BLOCK_M": 48, "BLOCK_N": 16, "num_warps": 4,
                                         "num_stages": 2, "maxnreg": 0})
    with pytest.raises(ValueError, match="register cap goes with the tma variant"):
        attention.prefill(*args, config={"variant": "ptr", "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4,
                                         "num_stages": 2, "maxnreg": 128})


def _good_paged():
    _, i = _paged_inputs([1, 3], [20, 9], 4, 2, 32, 8, "float32", "cpu")
    return i


def _table(rows):
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda i: i.update(block_tables=i["block_tables"][:, :2]), ValueError, "block_tables has 2 blocks per sequence"),
        (lambda i: i.update(context_lens=torch.tensor([20, 2], dtype=torch.int32)), ValueError,
         "query is longer than its context"),
        (lambda i: i.update(cu_seqlens_q=torch.tensor([0, 3, 1], dtype=torch.int32)), ValueError, "non-decreasing"),
        (lambda i: i.update(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=torch.int32)), ValueError,
         "end at the token count"),
        (lambda i: i["block_tables"].__setitem__((1, 1), 10_000), ValueError, "block index outside"),
        (lambda i: i.update(q=i["q"][:, :3]), ValueError, "not a multiple"),
        (lambda i: i.update(q=i["q"][..., :16]), ValueError, "head dims differ"),
        (lambda i: i.update(k_cache=i["k_cache"].half(), v_cache=i["v_cache"].half()), TypeError, "share one dtype"),
        (lambda i: i.update(block_tables=i["block_tables"].long()), TypeError, "block_tables must be int32"),
        (lambda i: i.update(context_lens=i["context_lens"].to("meta")), ValueError, "context_lens is on meta"),
        (lambda i: i.update(context_lens=i["context_lens"][:1]), ValueError, "context_lens has 1 entries"),
        (lambda i: i.update(k_cache=i["k_cache"][:, :6], v_cache=i["v_cache"][:, :6]), ValueError, "power of two"),
        (lambda i: i.update(v_cache=i["v_cache"][:, :4]), ValueError, "must have one shape"),
        (lambda i: i.update(max_seqlen_q=2), ValueError, "max_seqlen_q=2 is shorter"),
        (lambda i: i.update(k_cache=i["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
         "unit stride"),
    ],
)
def test_paged_bad_input(change, error, match) -> None:
    i = _good_paged()
    change(i)
    with pytest.raises(error, match=match):
        attention.paged(i["q"], i["k_cache"], i["v_cache"], i["block_tables"], i["cu_seqlens_q"], i["context_lens"],
                        i["max_seqlen_q"], out=i["out"])


def test_paged_decode_variant_needs_single_token_queries() -> None:
    i = _good_paged()
    with pytest.raises(ValueError, match="variant"):
        attention.paged(i["q"], i["k_cache"], i["v_cache"], i["block_tables"], i["cu_seqlens_q"], i["context_lens"],
                        3, config={"variant": "decode", "TILE": 16, "SPLIT": 1, "HEADS": 2, "BLOCK_Q": 1,
                                   "num_warps": 4, "num_stages": 2})


def test_bad_shapes_name_the_problem() -> None:
    with pytest.raises(ValueError, match="heads_q=6 is not a multiple"):
        PREFILL.space({"batch": 1, "seqlen": 8, "heads_q": 6, "heads_kv": 4, "head_dim": 64, "causal": True}, "float16")
    with pytest.raises(ValueError, match="query_len 9 exceeds context_len 8"):
        PAGED.space({"batch": 1, "query_len": 9, "context_len": 8, "heads_q": 4, "heads_kv": 4, "head_dim": 64,
                     "block_size": 16}, "float16")
    with pytest.raises(ValueError, match="missing"):
        PAGED.flops({"batch": 1})
    assert math.isfinite(PREFILL.bytes(PREFILL.tiny_shapes()[0], "float16"))


def test_attention_suite_quick_writes_its_table(tmp_path) -> None:
    import pandas as pd

    from experiments import attention_suite

    out = tmp_path / "attention.csv"
    assert attention_suite.main(["--quick", "--cap", "1", "--workers", "1", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert {"device", "torch", "triton", "date", "copy_GBps", "ms", "TFLOPs", "TBps", "roofline_frac", "config",
            "speedup_vs_sdpa_flash"} <= set(df)
    for suite in ("prefill", "decode"):
        ours = df[(df.suite == suite) & df.kind.isin(["default", "best"])]
        assert set(ours.kind) == {"default", "best"} and (ours.ms > 0).all() and (ours.failed.fillna(0) == 0).all()
        assert (ours.state == "ok").all() and ours.rel_error.notna().all()  # state ok: within tolerance
    dtype = df.dtype.iloc[0]
    for entry in attention_suite.cache_entries(df, dtype):  # what a GPU run merges into the cache
        fam = kernels.get_family(entry["family"])
        assert fam.check_config(entry["shape"], dtype, entry["config"]) == entry["config"]


def test_attention_suite_candidates_take_the_cached_config_and_its_neighbours() -> None:
    from experiments.attention_suite import DECODE, candidates
    from kernels.device import KNOWN_DEVICES, assume_device
    from kernels.family import config_steps

    shape = DECODE[1]  # B32 L1024: the default splits the context; the tuned config does not
    known = {"variant": "general", "TILE": 128, "SPLIT": 1, "HEADS": 4, "BLOCK_Q": 1, "num_warps": 4, "num_stages": 3}
    with assume_device(KNOWN_DEVICES["h200"]):
        default = PAGED.default_config(shape, "bfloat16")
        plain = candidates(PAGED, shape, "bfloat16", 20)
        seeded = candidates(PAGED, shape, "bfloat16", 20, known)
        invalid = candidates(PAGED, shape, "bfloat16", 20, {**known, "HEADS": 3})
    assert plain[0] == seeded[0] == default and len(seeded) == 21 and known not in plain
    assert seeded[1] == known and {**known, "num_stages": 2} in seeded  # one step from the cached config
    assert invalid == plain  # a cached config the shape cannot run seeds nothing
    assert all(min(sum(config_steps(c, default)), sum(config_steps(c, known))) <= 3 for c in seeded)
