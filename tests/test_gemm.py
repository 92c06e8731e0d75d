"""GEMM family: strides, specialisation of the emitted source, constraints and bad input."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import kernels
from kernels.family import rel_error
import kernels.gemm as gemm_module
from kernels.device import KNOWN_DEVICES
from kernels.gemm import FAMILY, matmul


def _as_h200(monkeypatch, smem_per_block: int = 232448) -> None:
    """Make the GEMM family see an H200 (compiled, not interpreted) on this machine."""
    h200 = dataclasses.replace(KNOWN_DEVICES["h200"], smem_per_block=smem_per_block)
    monkeypatch.setattr(gemm_module, "device_facts", lambda *_: h200)
    monkeypatch.setattr(gemm_module, "interpreting", lambda: False)


def _check(a: torch.Tensor, b: torch.Tensor, dtype: str, device, config=None) -> None:
    out = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype, device=device)
    matmul(a, b, config=config, out=out)
    ref = a.double() @ b.double()
    assert rel_error(out, ref) <= FAMILY.tolerance(dtype, device)


def test_any_strides(dtype: str, device) -> None:
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(3)
    big = torch.randn(90, 130, generator=g).to(device, dt)
    a = big[5:38, 7:100:2]  # a strided slice: [33, 47], row stride 130, column stride 2
    w = torch.randn(21, 47, generator=g).to(device, dt)
    _check(a, w.t(), dtype, device)  # transposed weight view
    _check(a.t().contiguous().t(), w.t().contiguous(), dtype, device)  # column-major A, row-major B
    configs = FAMILY.configs(FAMILY.shape_from_call(a, w.t()), dtype)
    for variant in ("splitk", "persistent"):  # (TMA needs 16-byte rows: K=47 rules it out)
        _check(a, w.t(), dtype, device, next(c for c in configs if c["variant"] == variant))


@pytest.mark.parametrize("M", [1, 3, 4])
def test_gemv_variant_covers_decode_rows(dtype: str, device, M: int) -> None:
    """The gemv variant: every row of A up to GEMV_MAX_M in one program, column tiles that do not
    divide N, a K that no tile divides, strided operands; absent from the space above that M."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(M)
    a = torch.randn(M, 2 * 600, generator=g).to(device, dt)[:, ::2]  # [M, 600], column stride 2
    w = torch.randn(37, 600, generator=g).to(device, dt)
    shape = FAMILY.shape_from_call(a, w.t())
    configs = [c for c in FAMILY.configs(shape, dtype) if c["variant"] == "gemv"]
    assert {c["BLOCK_N"] for c in configs} >= {1, 2, 8, 16, 32} and {c["BLOCK_K"] for c in configs} >= {128, 512, 1024}
    assert {c["num_stages"] for c in configs} >= {1, 3} and FAMILY.default_config(shape, dtype) in configs
    for cfg in configs[:: max(1, len(configs) // 5)]:
        _check(a, w.t(), dtype, device, cfg)
        _check(a, w.t().contiguous(), dtype, device, cfg)  # B row-major [K, N]
    assert "gemv" not in FAMILY.space({"M": gemm_module.GEMV_MAX_M + 1, "N": 37, "K": 600}, dtype)["variant"]
    wide = {"variant": "tiled", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "SPLIT_K": 1,
            "num_warps": 4, "num_stages": 3}
    assert FAMILY.reject(shape, dtype, wide) is None
    for narrow in ({"BLOCK_N": 8}, {"num_stages": 1}, {"num_warps": 2}):
        assert "are gemv's" in (FAMILY.reject(shape, dtype, {**wide, **narrow}) or ""), narrow


@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_gemv_default_tiles_are_valid_on_a_gpu(M: int, monkeypatch) -> None:
    """gemv_default's GPU branch (the interpreter takes another): one column a program for one row,
    R columns for R padded rows, the LM-head tile past 32768 columns; every tile in the gemv space
    and its accumulator within the register rule, short K included."""
    monkeypatch.setattr(gemm_module, "interpreting", lambda: False)
    for N, K in ((2048, 2048), (3072, 2048), (128256, 2048), (37, 600), (64, 96)):
        cfg = gemm_module.gemv_default(M, N, K)
        assert cfg["BLOCK_N"] in gemm_module.GEMV_BLOCK_N and cfg["num_stages"] in (1, 4), cfg
        assert cfg["BLOCK_K"] in (64, *gemm_module.GEMV_BLOCK_K) and cfg["BLOCK_K"] <= max(128, 1 << (K - 1).bit_length())
        assert gemm_module.gemv_accumulator_reject(M, cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) is None, cfg
        want_n = 4 if N > 32768 else (1 if M == 1 else 1 << (M - 1).bit_length())
        assert cfg["BLOCK_N"] == want_n, (N, cfg)


def test_tma_variant_copies_unsupported_layouts(device) -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(32, 64, generator=g).to(device, torch.float16).t().contiguous().t()  # column-major
    b = torch.randn(64, 48, generator=g).to(device, torch.float16)
    shape = FAMILY.shape_from_call(a, b)
    cfg = next(c for c in FAMILY.configs(shape, "float16") if c["variant"] == "tma_persistent")
    _check(a, b, "float16", device, cfg)


def test_even_k_drops_the_k_mask() -> None:
    cfg = {"variant": "tiled", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 1,
           "num_warps": 4, "num_stages": 2}
    even = FAMILY.emit({"M": 16, "N": 32, "K": 64}, "float16", cfg)
    ragged = FAMILY.emit({"M": 16, "N": 32, "K": 70}, "float16", cfg)
    assert "k_left" not in even
    assert "k_left" in ragged
    assert "splitk_reduce_kernel" not in even and "GROUP_M > 1" not in even


def test_structural_variants_emit_their_own_code() -> None:
    shape = {"M": 256, "N": 256, "K": 256}
    by_variant = {}
    for cfg in FAMILY.configs(shape, "float16"):
        by_variant.setdefault(cfg["variant"], cfg)
    assert set(by_variant) >= {"tiled", "splitk", "persistent"}
    src = {v: FAMILY.emit(shape, "float16", c) for v, c in by_variant.items()}
    assert "splitk_reduce_kernel" in src["splitk"] and "splitk_reduce_kernel" not in src["tiled"]
    assert "tl.num_programs(0)" in src["persistent"] and "tl.num_programs(0)" not in src["tiled"]


def test_tiny_m_gets_small_tiles_and_smem_is_bounded() -> None:
    assert FAMILY.space({"M": 1, "N": 4096, "K": 4096}, "bfloat16")["BLOCK_M"] == [16]
    assert FAMILY.space({"M": 16, "N": 4096, "K": 4096}, "bfloat16")["BLOCK_M"] == [16]
    assert 256 in FAMILY.space({"M": 4096, "N": 4096, "K": 4096}, "bfloat16")["BLOCK_M"]
    limit = kernels.device.device_facts().smem_per_block
    for cfg in FAMILY.configs({"M": 4096, "N": 4096, "K": 4096}, "float32"):
        per_stage = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 4
        assert cfg["num_stages"] * per_stage <= limit
    big = {"variant": "tiled", "BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8, "SPLIT_K": 1,
           "num_warps": 8, "num_stages": 5}
    with pytest.raises(ValueError, match="registers|shared memory"):
        FAMILY.check_config({"M": 4096, "N": 4096, "K": 4096}, "float32", big)


def test_default_config_is_valid_over_many_shapes() -> None:
    for M in (1, 3, 16, 17, 64, 100, 256, 4096):
        for N, K in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (7, 9)):
            for dtype in ("float16", "bfloat16", "float32"):
                shape = {"M": M, "N": N, "K": K}
                assert FAMILY.reject(shape, dtype, FAMILY.default_config(shape, dtype)) is None


def test_hopper_default_is_the_subtiled_tma_variant_and_valid(monkeypatch) -> None:
    """With an H200's facts: M > 64 with TMA-aligned rows defaults to tma_persistent_subtile (128x256
    tiles when they fill the last wave, else 128x128, or 64x128 when 128x128 tiles leave SMs idle),
    split-K or one-tile 128x96 where those fill the SMs better; anything else to the pointer
    variants; every default passes the constraints."""
    _as_h200(monkeypatch)
    picks = {}
    for M in (1, 16, 64, 65, 100, 256, 1024, 4096):
        for N, K in ((4096, 4096), (6144, 4096), (2048, 8192), (4096, 14336), (7, 9), (3072, 2048)):
            for dtype in ("float16", "bfloat16", "float32"):
                shape = {"M": M, "N": N, "K": K}
                cfg = FAMILY.default_config(shape, dtype)
                assert FAMILY.reject(shape, dtype, cfg) is None, (shape, dtype, cfg)
                picks[(M, N, K, dtype)] = cfg
    assert picks[(4096, 4096, 4096, "bfloat16")]["variant"] == "tma_persistent_subtile"
    assert picks[(4096, 4096, 4096, "bfloat16")]["BLOCK_N"] == 256  # 32 x 16 = 512 tiles: 97% of 4 waves
    assert picks[(1024, 6144, 4096, "bfloat16")]["BLOCK_N"] == 128  # 8 x 24 = 192 tiles: 73% of 2 waves
    assert picks[(1024, 6144, 4096, "bfloat16")]["BLOCK_M"] == 128  # 384 tiles of 128x128 fill 2.9 waves
    small = picks[(256, 4096, 4096, "bfloat16")]  # 128x128 would be 64 tiles on 132 SMs
    assert (small["variant"], small["BLOCK_M"], small["BLOCK_N"], small["BLOCK_K"]) == ("tma_persistent_subtile", 64, 128, 128)
    wide = picks[(256, 6144, 4096, "bfloat16")]  # 96 tiles of 128x128 idle 36 SMs; 128 of 128x96 do not
    assert (wide["variant"], wide["BLOCK_M"], wide["BLOCK_N"], wide["BLOCK_K"]) == ("tma", 128, 96, 128)
    split = picks[(256, 2048, 8192, "bfloat16")]  # 32 tiles of 128x128; x 4 slices of K 2048: 128 programs
    assert (split["variant"], split["BLOCK_M"], split["SPLIT_K"]) == ("tma_splitk", 128, 4)
    short = picks[(256, 3072, 2048, "bfloat16")]  # slices of K 512 would be too short to pay for the reduction
    assert (short["variant"], short["BLOCK_M"], short["SPLIT_K"]) == ("tma_persistent_subtile", 64, 1)
    assert picks[(100, 7, 9, "bfloat16")]["variant"] == "tiled"  # rows too short for TMA
    assert not picks[(64, 4096, 4096, "bfloat16")]["variant"].startswith("tma_persistent")


def test_empty_and_degenerate_shapes(device) -> None:
    a = torch.randn(0, 8, device=device, dtype=torch.float16)
    assert matmul(a, torch.randn(8, 5, device=device, dtype=torch.float16)).shape == (0, 5)
    out = matmul(torch.randn(3, 0, device=device), torch.randn(0, 4, device=device))
    assert torch.equal(out, torch.zeros(3, 4, device=device))


@pytest.mark.parametrize(
    "a,b,err,match",
    [
        (torch.randn(4, 5), torch.randn(6, 3), ValueError, "inner dimensions"),
        (torch.randn(4, 5, 2), torch.randn(5, 3), ValueError, "2-D"),
        (torch.randn(4), torch.randn(4, 3), ValueError, "2-D"),
        (torch.ones(4, 5, dtype=torch.int32), torch.ones(5, 3, dtype=torch.int32), TypeError, "dtype"),
        (torch.randn(4, 5), torch.randn(5, 3, dtype=torch.float16), TypeError, "dtype"),
        (torch.randn(4, 5), [[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(a, b, err, match) -> None:
    with pytest.raises(err, match=match):
        matmul(a, b)


def test_bad_config() -> None:
    a, b = torch.randn(16, 32), torch.randn(32, 32)
    good = FAMILY.default_config({"M": 16, "N": 32, "K": 32}, "float32")
    with pytest.raises(ValueError, match="BLOCKM"):
        matmul(a, b, config={**good, "BLOCKM": 16})
    with pytest.raises(ValueError, match="BLOCK_N"):
        matmul(a, b, config={**good, "BLOCK_N": 48})
    with pytest.raises(ValueError, match="SPLIT_K"):
        matmul(a, b, config={**good, "SPLIT_K": 2})
    with pytest.raises(TypeError, match="config"):
        matmul(a, b, config="fast")


@pytest.mark.gpu
def test_operands_on_different_devices() -> None:
    with pytest.raises(ValueError, match="device"):
        matmul(torch.randn(4, 5, device="cuda"), torch.randn(5, 3))


def test_emitted_modules_are_cached_on_disk(tmp_path, monkeypatch) -> None:
    from kernels import generator

    monkeypatch.setenv("WORKBENCH_KERNEL_CACHE", str(tmp_path))
    shape, cfg = {"M": 16, "N": 32, "K": 32}, FAMILY.default_config({"M": 16, "N": 32, "K": 32}, "float16")
    facts = FAMILY.facts(shape, "float16", cfg)
    path = generator.source_path(FAMILY, facts)
    assert path.parent == tmp_path and path.read_text() == FAMILY.emit(shape, "float16", cfg)
    assert generator.source_path(FAMILY, facts) == path  # same facts, same file
    other = generator.source_path(FAMILY, {**facts, "NUM_STAGES": facts["NUM_STAGES"] + 1})
    assert other != path


def test_emit_command(tmp_path) -> None:
    out = tmp_path / "v.py"
    cfg = FAMILY.default_config({"M": 1, "N": 64, "K": 64}, "float16")
    run = subprocess.run(
        [sys.executable, "-m", "kernels.emit", "gemm", "--shape", "M=1,N=64,K=64", "--config", json.dumps(cfg),
         "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "def gemm_kernel" in out.read_text()
    bad = subprocess.run([sys.executable, "-m", "kernels.emit", "gemm", "--shape", "M=1,N=64"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "K" in bad.stderr


def test_subtiled_epilogue_stores_both_halves(device) -> None:
    """tma_persistent_subtile writes C as two half-tiles: both halves (and ragged edges) land."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(40, 64, generator=g).to(device, torch.float16)
    w = torch.randn(72, 64, generator=g).to(device, torch.float16)  # N = 72: the last tile is ragged
    cfg = {"variant": "tma_persistent_subtile", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 1,
           "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
    FAMILY.check_config(FAMILY.shape_from_call(a, w.t()), "float16", cfg)
    _check(a, w.t(), "float16", device, cfg)
    src = FAMILY.emit(FAMILY.shape_from_call(a, w.t()), "float16", cfg)
    assert "tl.split" in src and "BLOCK_N.value // 2" in src


@pytest.mark.parametrize("block_m", [32, 64])
@pytest.mark.parametrize("block_n", [96, 192])
def test_tiles_of_two_column_parts(block_m: int, block_n: int, dtype: str, device) -> None:
    """A BLOCK_N of three powers of two (96 = 64 + 32, 192 = 128 + 64) computes and stores both
    column parts: N = 200 leaves the last tile's second part (or all of it) past the edge, several
    tile-rows with grouped order, B both ways; other variants reject such a tile."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(block_n)
    a = torch.randn(70, 96, generator=g).to(device, dt)
    w = torch.randn(200, 96, generator=g).to(device, dt)
    cfg = {"variant": "tma", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "GROUP_M": 8,
           "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
    shape = FAMILY.shape_from_call(a, w.t())
    assert block_n in FAMILY.space(shape, dtype)["BLOCK_N"]
    FAMILY.check_config(shape, dtype, cfg)
    _check(a, w.t(), dtype, device, cfg)
    _check(a, w.t().contiguous(), dtype, device, cfg)  # B row-major [K, N]
    src = FAMILY.emit(shape, dtype, cfg)
    assert "acc1 = tl.dot" in src and "c1_desc.store" in src
    for other in ("tiled", "tma_persistent", "tma_persistent_subtile", "tma_stream_k", "tma_splitk"):
        assert "not a power of two" in FAMILY.reject(shape, dtype, {**cfg, "variant": other})


@pytest.mark.parametrize("M,N,K,group_m", [(40, 72, 160, 1), (100, 200, 480, 8), (16, 32, 32, 1)])
def test_stream_k_hands_partial_tiles_over(M: int, N: int, K: int, group_m: int, device) -> None:
    """tma_stream_k: tiles whose K steps fall in several programs' ranges (on the interpreter's 4
    programs every shape here but the last splits tiles) come out right, twice in a row: the
    finishers reset every hand-over flag they consumed."""
    g = torch.Generator().manual_seed(M)
    a = torch.randn(M, K, generator=g).to(device, torch.float16)
    w = torch.randn(N, K, generator=g).to(device, torch.float16)
    cfg = {"variant": "tma_stream_k", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": group_m,
           "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
    shape = FAMILY.shape_from_call(a, w.t())
    FAMILY.check_config(shape, "float16", cfg)
    for _ in range(2):
        _check(a, w.t(), "float16", device, cfg)
    module = FAMILY.resolve(shape, "float16", cfg)[1]
    flags = module._flags(torch.device(device), 1)
    assert flags.numel() >= 1 and int(flags.abs().sum()) == 0
    src = FAMILY.emit(shape, "float16", cfg)
    assert "atomic_cas" in src and "tl.split" in src


@pytest.mark.parametrize("M,N,K,split", [(40, 72, 160, 4), (70, 96, 224, 2), (100, 200, 480, 8)])
def test_tma_splitk_sums_its_slices(M: int, N: int, K: int, split: int, device) -> None:
    """tma_splitk: every K slice's float32 partial lands in the workspace (half-tile stores, ragged
    edges; at K = 160 five K tiles in slices of two leave the last slice none) and the reduction
    sums them."""
    g = torch.Generator().manual_seed(K)
    a = torch.randn(M, K, generator=g).to(device, torch.float16)
    w = torch.randn(N, K, generator=g).to(device, torch.float16)
    cfg = {"variant": "tma_splitk", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32 if split < 8 else 64,
           "GROUP_M": 8 if M > 64 else 1, "SPLIT_K": split, "num_warps": 4, "num_stages": 2}
    shape = FAMILY.shape_from_call(a, w.t())
    FAMILY.check_config(shape, "float16", cfg)
    _check(a, w.t(), "float16", device, cfg)
    src = FAMILY.emit(shape, "float16", cfg)
    assert "splitk_reduce_kernel" in src and "TensorDescriptor" in src
    assert FAMILY.reject(shape, "float16", {**cfg, "SPLIT_K": 1}) is not None  # split-K needs slices


def test_shared_memory_model_counts_the_subtile_shuffle_of_two_warp_groups(monkeypatch) -> None:
    """With an H200's facts: 64x256x64 subtiled tiles with 8 warps and 5 stages compiled to 253,992
    bytes of shared memory (above the 232,448 an H200 block may use) and failed on the GPU in the
    efficiency run; the model rules them out before compiling, and keeps the 4-warp twin."""
    _as_h200(monkeypatch)
    shape = {"M": 1024, "N": 6144, "K": 4096}
    cfg = {"variant": "tma_persistent_subtile", "BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8,
           "SPLIT_K": 1, "num_warps": 8, "num_stages": 5}
    assert "shared memory" in FAMILY.reject(shape, "bfloat16", cfg)
    assert FAMILY.reject(shape, "bfloat16", {**cfg, "num_warps": 4}) is None


@pytest.mark.parametrize("variant,tile,warps,stages,compiled", [
    ("tma_splitk", (128, 256, 64), 8, 3, 147480),  # one tile a program: the epilogue reuses the pipeline
    ("tma", (128, 32, 64), 4, 2, 40976),
    ("tma_persistent", (128, 128, 64), 4, 5, 196648),  # persistent: the epilogue comes on top
    ("tma_persistent_subtile", (64, 256, 64), 8, 2, 131088),  # plus the two-warp-group shuffle
    ("tma_stream_k", (256, 64, 128), 4, 2, 180240),
    ("tma", (128, 96, 64), 4, 5, 143448),  # two column parts: both staging buffers, two barrier arrays
    ("tma", (128, 96, 64), 4, 4, 114752),
    ("tma", (128, 96, 128), 4, 4, 229440),
])
def test_shared_memory_model_matches_the_sm90_compile(monkeypatch, variant, tile, warps, stages, compiled) -> None:
    """The constraint's byte count equals what Triton 3.6 allocated compiling these configs for sm_90
    (``metadata.shared``, compiled on a CPU machine with Triton's bundled ptxas)."""
    _as_h200(monkeypatch, smem_per_block=1)  # 1 byte: every config reports its need
    bm, bn, bk = tile
    cfg = {"variant": variant, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
           "SPLIT_K": 2 if variant == "tma_splitk" else 1, "num_warps": warps, "num_stages": stages}
    assert f"needs {compiled} bytes of shared memory" in FAMILY.reject({"M": 1024, "N": 6144, "K": 4096}, "bfloat16", cfg)
