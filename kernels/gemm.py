"""The GEMM family: C[M, N] = A[M, K] @ B[K, N] with float32 accumulation.

Structural variants (the categorical parameter ``variant``):
- ``tiled``: one program per output tile, tiles visited in L2-friendly groups of GROUP_M rows;
- ``splitk``: K cut into SPLIT_K slices computed by separate programs, then summed by a second
  kernel (more parallelism for small M x N with a long K);
- ``persistent``: about one program per SM, each looping over tiles;
- ``tma`` and ``tma_persistent`` (Hopper, and the interpreter): tiles moved by tensor descriptors;
- ``tma_persistent_subtile``: ``tma_persistent`` storing C in two half-tiles, so the epilogue's
  shared-memory staging buffer is half a tile and a deeper pipeline fits;
- ``tma_stream_k``: stream-K over TMA tiles (half-tile stores too): every (tile, K step) iteration
  of the problem in one sequence cut into one equal range per SM, partial tiles handed over through
  a float32 workspace, so a problem of fewer tiles than SMs (M = 256, say) still uses every SM;
- ``tma_splitk``: ``splitk`` over TMA tiles: the float32 partial tiles go to the workspace as two
  half-tile tensor-memory stores;
- ``tma`` also takes tiles 96 and 192 wide (``BLOCK_N`` three times a power of two), computed and
  stored as two column parts of powers of two (64 + 32, 128 + 64): a width that cuts N into a
  number of tiles close to the SM count where powers of two cannot (256 x 6144: 128 tiles of 128x96
  for 132 SMs, against 96 of 128x128);
- ``gemv`` (M <= 4, decode): no tensor cores. Each program owns BLOCK_N columns of C for every row,
  multiplies [BLOCK_N, BLOCK_K] tiles of B with A's rows elementwise in float32 and sums over K at
  the end. Narrow tiles (8 or 16 columns) give enough programs to keep every SM streaming B without
  splitting K (so without a second, reducing kernel).

The template is ``kernels/templates/gemm.py.j2``. Shape dicts are ``{"M", "N", "K"}`` with an
optional ``"b_transposed"`` (bool, default True): B is a transposed view of a row-major [N, K]
weight, as in a linear layer, which is how the engine calls it.
"""
from __future__ import annotations

from typing import Any

import torch

from kernels.device import device_facts, interpreting, programmatic_launch
from kernels.family import Config, Family, Shape, dtype_name, is_pow2, next_pow2, positive_dims, torch_dtype

VARIANTS = ("tiled", "splitk", "persistent", "tma", "tma_persistent", "tma_persistent_subtile", "tma_stream_k",
            "tma_splitk", "gemv")
GEMV_MAX_M = 4  # the gemv variant's accumulator holds every row: [next_pow2(M), BLOCK_N, BLOCK_K]
_HALF_STORE = ("tma_persistent_subtile", "tma_stream_k", "tma_splitk")  # variants storing C as two half-tiles
_SPLIT = ("splitk", "tma_splitk")
_ONE_TILE = ("tma", "tma_splitk")  # TMA variants whose programs each own one tile
# The variant taking a BLOCK_N of two column parts (96, 192). The persistent variants ran such tiles
# at half the speed of one tile a program (results/gemm_parts_n/), so they keep powers of two.
_PARTS_N = ("tma",)
_INT32_MAX = 2**31 - 1


def _elt(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def _tma_misaligned(N: int, K: int, dtype: str) -> bool:
    """Whether rows of A [M, K], B and C [M, N] miss the 16-byte alignment tensor descriptors need."""
    return bool((K * _elt(dtype)) % 16 or (N * _elt(dtype)) % 16)


def n_parts(block_n: int) -> list[int]:
    """The column parts of a tile ``block_n`` wide: itself if a power of two, else the largest power
    of two below it and the rest (96 -> [64, 32]); ``ValueError`` if the rest is not a power of two."""
    if is_pow2(block_n):
        return [block_n]
    first = 1 << (block_n.bit_length() - 1)
    if not is_pow2(block_n - first):
        raise ValueError(f"BLOCK_N={block_n} is neither a power of two nor the sum of two")
    return [first, block_n - first]


# GEMV tiles (the gemm family's gemv variant and kernels/gemv_prologue.py): one to 16 columns of C
# a program, K steps up to 2048 deep. At M = 1 on an H200 (cold L2, timed in CUDA graphs), one or
# two columns a program over K steps of 1024-2048, without software pipelining, streamed the decode
# weights of llama-3.2-1b fastest: 3.5 TB/s at 16384x2048, 1.05-1.12x the best 8-column tile and
# 1.16-1.41x cuBLAS (results/gemv_tiles/NOTES.md). Deep K steps put every load of a program in flight
# at once; narrow tiles give the small matrices thousands of programs.
GEMV_BLOCK_N = (1, 2, 4, 8, 16)
GEMV_BLOCK_K = (128, 256, 512, 1024, 2048)


def gemv_default(rows: int, N: int, K: int) -> Config:
    """The GEMV tile of the note above: one column a program, K steps of 1024 (or K's next power of
    two if smaller), 4 warps, one stage. With R > 1 padded rows, as the winners tuned at M = 2 and 4
    on an H200 (2048x2048): R columns, K steps of 1024 / R, 2 warps and 4 stages (the one-row tile
    took 6.9 and 9.8 us there, the tuned ones 5.9 and 6.3). Past 32768 columns (an LM head), the
    tile tuned for llama-3.2-1b's at M = 1: 4 columns, K steps of 512, 1 warp, 4 stages (147 us
    with one column, 126 us with this). The K step halves until the accumulator fits.

    Triton's interpreter runs the programs one after another in Python, so there the fewest
    programs win instead: 16 rows x columns a program, K steps of up to 512, 8 warps."""
    if interpreting():
        return {"BLOCK_N": max(1, 16 // next_pow2(rows)), "BLOCK_K": min(512, max(min(GEMV_BLOCK_K), next_pow2(K))),
                "num_warps": 8, "num_stages": 1}
    if N > 32768:
        cfg = {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 1, "num_stages": 4}
    elif rows == 1:
        cfg = {"BLOCK_N": 1, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1}
    else:
        r = next_pow2(rows)
        cfg = {"BLOCK_N": r, "BLOCK_K": 1024 // r, "num_warps": 2, "num_stages": 4}
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(min(GEMV_BLOCK_K), next_pow2(K)))
    while gemv_registers(rows, cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) > 64 and cfg["BLOCK_K"] > 64:
        cfg["BLOCK_K"] //= 2
    while gemv_registers(rows, cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) < 4 and cfg["num_warps"] > 1:
        cfg["num_warps"] //= 2  # a short K: fewer warps, not idle threads
    return cfg


def gemv_registers(rows: int, block_n: int, block_k: int, warps: int) -> int:
    """Registers a thread holds for a GEMV's float32 accumulator [next_pow2(rows), block_n, block_k]."""
    return next_pow2(rows) * block_n * block_k // (32 * warps)


def gemv_accumulator_reject(rows: int, block_n: int, block_k: int, warps: int) -> str | None:
    """Why a GEMV's float32 accumulator [next_pow2(rows), block_n, block_k] does not suit ``warps``
    warps (it must be 4 to 64 registers a thread), or None. The gemm family's ``gemv`` variant and
    the GEMVs with a fused prologue (kernels/gemv_prologue.py) hold the same accumulator."""
    per_thread = gemv_registers(rows, block_n, block_k, warps)
    if not 4 <= per_thread <= 64:
        return (f"a {next_pow2(rows)}x{block_n}x{block_k} float32 accumulator is {per_thread} registers "
                f"per thread with {warps} warps")
    return None


def _wave_fill(programs: int, sms: int) -> float:
    """How full the last wave of ``programs`` equal programs on ``sms`` SMs is (1.0: no idle SM)."""
    return programs / (-(-programs // sms) * sms)


def _hopper_tiles(M: int, N: int, K: int, sms: int) -> Config:
    """The TMA config for M > 64 on Hopper that keeps ``sms`` SMs busy (see ``default_config``)."""
    cfg: Config = dict(variant="tma_persistent_subtile", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8,
                       SPLIT_K=1, num_warps=8, num_stages=4)
    if _wave_fill(-(-M // 128) * -(-N // 256), sms) >= 0.9:
        return cfg
    cfg.update(BLOCK_N=128, num_warps=4, num_stages=5)
    tiles = -(-M // 128) * -(-N // 128)
    if tiles >= sms:
        return cfg
    few = 2 * tiles < sms  # under half the SMs busy: split K while the slices stay long
    split = next((s for s in (2, 4, 8) if _wave_fill(tiles * s, sms) >= 0.9 and K // s >= 1024), 1) if few else 1
    if _wave_fill(-(-M // 64) * -(-N // 128), sms) >= 0.9 or (few and split == 1):
        cfg.update(BLOCK_M=64, BLOCK_K=128, num_stages=4)
    elif few:
        cfg.update(variant="tma_splitk", SPLIT_K=split)
    elif _wave_fill(-(-M // 128) * -(-N // 96), sms) >= 0.9:
        cfg.update(variant="tma", BLOCK_N=96, BLOCK_K=128, num_stages=4)
    return cfg


def _dims(shape: Shape) -> tuple[int, int, int]:
    return positive_dims("gemm", shape, ("M", "N", "K"))


class GemmFamily(Family):
    name = "gemm"
    template_file = "gemm.py.j2"
    template_version = 1

    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        M, N, K = _dims(shape)
        torch_dtype(dtype)
        tma_ok = interpreting() or device_facts().capability >= (9, 0)
        # Tiles larger than the problem's next power of two only add masked work.
        if M <= 16:
            block_m = [16]  # decode shapes: tl.dot's smallest tile
        else:
            block_m = [b for b in (16, 32, 64, 128, 256) if b <= max(16, next_pow2(M))]
        # The gemv variant (M <= GEMV_MAX_M) adds its narrow column tiles and deep K steps.
        gemv = M <= GEMV_MAX_M
        return {
            "variant": [v for v in VARIANTS if (tma_ok or not v.startswith("tma")) and (gemv or v != "gemv")],
            "BLOCK_M": block_m,
            "BLOCK_N": sorted({b for b in (32, 64, 96, 128, 192, 256) if (tma_ok or is_pow2(b))
                               and b <= max(32, next_pow2(N))} | (set(GEMV_BLOCK_N) if gemv else set())),
            "BLOCK_K": sorted({b for b in (32, 64, 128, 256) if b <= max(32, next_pow2(K))}
                              | ({b for b in GEMV_BLOCK_K if b <= max(128, next_pow2(K))} if gemv else set())),
            "GROUP_M": [1, 8],
            "SPLIT_K": [1, 2, 4, 8, 16],
            "num_warps": [1, 2, 4, 8] if gemv else [4, 8],
            "num_stages": [1, 2, 3, 4, 5] if gemv else [2, 3, 4, 5],
        }

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        M, N, K = _dims(shape)
        v, bm, bn, bk = config["variant"], config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        split, warps, stages = config["SPLIT_K"], config["num_warps"], config["num_stages"]
        elt = _elt(dtype)
        if not is_pow2(bn) and (v not in _PARTS_N or len(n_parts(bn)) != 2):
            return f"BLOCK_N={bn} is not a power of two: only {', '.join(_PARTS_N)} takes such a tile, in two column parts"
        if (v in _SPLIT) != (split > 1):
            return "SPLIT_K > 1 goes with the split-K variants and only with them"
        if split > 1 and -(-K // bk) < split:
            return f"K={K} has fewer than SPLIT_K={split} tiles of {bk}"
        if config["GROUP_M"] > 1 and -(-M // bm) <= 1:
            return "GROUP_M > 1 needs more than one tile-row"
        if v == "gemv":
            if M > GEMV_MAX_M:
                return f"gemv holds every row of A: M <= {GEMV_MAX_M}"
            return gemv_accumulator_reject(M, bn, bk, warps)
        if bn < 32 or bk > 256 or warps < 4 or stages < 2:
            return "BLOCK_N below 32, BLOCK_K above 256, fewer than 4 warps and one stage are gemv's"
        acc_per_thread = bm * bn // (32 * warps)
        if acc_per_thread > 128:
            return f"{bm}x{bn} float32 accumulator is {acc_per_thread} registers per thread with {warps} warps"
        if acc_per_thread < 4:
            return f"{warps} warps for a {bm}x{bn} tile leave threads idle"
        smem = stages * (bm * bk + bk * bn) * elt
        if v.startswith("tma"):
            # The epilogue tile (half of it with subtiling; a split-K partial is float32) staged for
            # the TMA store. With one tile per program it reuses the pipeline's buffers; a persistent
            # program's next loads are in flight meanwhile, so there it comes on top. Plus one
            # 8-byte barrier per pipeline stage. (Exact against Triton 3.6's sm_90 compile for tiles
            # of 64 rows or more.)
            epilogue = bm * bn * (4 if v in _SPLIT else elt) // (2 if v in _HALF_STORE else 1)
            barriers = 8 * stages
            if not is_pow2(bn):
                # Two column parts: both staging buffers are live, and the loads take a second
                # array of barriers after the first (padded to 16 bytes).
                epilogue = bm * bn * elt
                barriers += 8 * stages + 8 * (stages % 2)
            smem = (max(smem, epilogue) if v in _ONE_TILE else smem + epilogue) + barriers
            if v == "tma_persistent_subtile" and bm == 64 and warps == 8 and is_pow2(bn):
                # Two warp groups on 64 rows split N between them, so halving the tile shuffles the
                # accumulator through shared memory, live while the next tile's loads are in flight
                # (Triton 3.6's sm_90 compile: bm * bn * 2 bytes, 8 KiB at least, more).
                smem += max(8192, bm * bn * 2)
            if _tma_misaligned(N, K, dtype):
                return "TMA needs rows of A, B and C aligned to 16 bytes"
        limit = device_facts().smem_per_block
        if smem > limit:
            return f"needs {smem} bytes of shared memory, the device has {limit}"
        return None

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """A heuristic from the H200 tuning runs (results/tune_suite_nvidia_h200.csv), shrunk until valid.

        M > 64 on Hopper, rows of A, B and C aligned for TMA: ``tma_persistent_subtile`` (the
        fixed-config comparison results/gemm_subtile_ab_nvidia_h200.csv: 0.79-1.02x cuBLAS where the
        pointer variants reach 0.42-0.89x), with the tile that keeps every SM busy
        (results/efficiency/gemm_bfloat16_nvidia_h200_subgrid_exhaustive.csv, every config of that
        variant's grid measured): 128x256x64 with 8 warps and 4 stages when those tiles fill the
        last wave of programs to 90% or more; else 128x128x64 with 4 warps and 5 stages (twice the
        tiles: a wave of 1.45 becomes 2.9). When even those are fewer than the SMs (M = 256; the
        fixed-config comparison results/gemm_m256/gemm_m256_ab_nvidia_h200.csv): 64x128x128 with 4
        warps and 4 stages if those fill a wave to 90% (256x4096x4096: 128 tiles for 132 SMs, 1.3x
        the 128x128 tile); else, when 128x128 tiles keep under half the SMs busy, ``tma_splitk`` on
        them with the fewest K slices (2, 4 or 8, each at least 1024 deep) that fill the last wave
        to 90% (256x2048x8192: 32 tiles x 4 slices, 1.36x the best unsplit tile), or 64x128x128
        where the slices would be shorter (256x3072x2048, 256x2048x2048: the reduction's traffic
        costs more than the idle SMs); else, when 128x96 tiles (two column parts, the ``tma``
        variant) fill a wave to 90%, those with BLOCK_K 128, 4 warps and 4 stages (256x6144x4096:
        128 tiles for 132 SMs, 1.12x the 96 tiles of 128x128 in results/gemm_parts_n/).
        Elsewhere for M > 64: 128x256x64 tiles, 8 warps, grouped order.
        M <= 4 (decode): the ``gemv`` variant with the tile of ``gemv_default``.
        Up to M = 64 (small batches) the GEMM is bound by streaming B, so what matters is enough programs to
        keep every SM loading: the widest N tile that still gives about one tile per SM, and when
        even 32-wide tiles give too few (small N), K split across programs until they do -- the
        structure of every small-M winner of results/tune_suite_nvidia_h200.csv.
        """
        M, N, K = _dims(shape)
        space = self.space(shape, dtype)
        facts = device_facts()
        if M > 64 and facts.capability >= (9, 0) and not _tma_misaligned(N, K, dtype):
            cfg = _hopper_tiles(M, N, K, facts.num_sms)
        elif M <= GEMV_MAX_M:
            cfg = dict(variant="gemv", BLOCK_M=16, GROUP_M=1, SPLIT_K=1, **gemv_default(M, N, K))
        elif M > 64:
            cfg = dict(variant="tiled", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SPLIT_K=1,
                       num_warps=8, num_stages=3)
        else:
            sms = facts.num_sms
            bm = 16 if M <= 16 else 64
            rows = -(-M // bm)
            bn = next((b for b in (256, 128, 64) if rows * -(-N // b) >= 0.8 * sms), 32)
            split = 1
            while rows * -(-N // bn) * split < 0.8 * sms and split < 8 and K // (2 * split) >= 512:
                split *= 2
            cfg = dict(variant="splitk" if split > 1 else "tiled", BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=256 if bn <= 64 else 128, GROUP_M=1, SPLIT_K=split, num_warps=4, num_stages=4)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            cfg[key] = max(c for c in space[key] if c <= cfg[key]) if min(space[key]) <= cfg[key] else min(space[key])
        # Shrink what the shape or device cannot hold: pipeline depth, then the deepest tile.
        while self.reject(shape, dtype, cfg) is not None:
            if self.reject(shape, dtype, {**cfg, "GROUP_M": 1}) is None:
                cfg["GROUP_M"] = 1
            elif cfg["num_stages"] > 2:
                cfg["num_stages"] -= 1
            elif cfg["num_warps"] == 8 and cfg["BLOCK_M"] * cfg["BLOCK_N"] < 128 * 128:
                cfg["num_warps"] = 4
            elif cfg["BLOCK_K"] > min(space["BLOCK_K"]):
                cfg["BLOCK_K"] //= 2
            elif cfg["BLOCK_N"] > min(space["BLOCK_N"]):
                cfg["BLOCK_N"] = max(b for b in space["BLOCK_N"] if b < cfg["BLOCK_N"])
            elif cfg["BLOCK_M"] > min(space["BLOCK_M"]):
                cfg["BLOCK_M"] //= 2
            else:
                return self.configs(shape, dtype)[0]
        return cfg

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        M, N, K = _dims(shape)
        facts = {
            "VARIANT": config["variant"],
            "BLOCK_M": config["BLOCK_M"],
            "BLOCK_N": config["BLOCK_N"],
            "BLOCK_K": config["BLOCK_K"],
            "GROUP_M": config["GROUP_M"],
            "SPLIT_K": config["SPLIT_K"],
            "NUM_WARPS": config["num_warps"],
            "NUM_STAGES": config["num_stages"],
        }
        if config["variant"].startswith("tma"):
            facts["B_TRANS"] = bool(shape.get("b_transposed", True))
            facts["N_PARTS"] = n_parts(config["BLOCK_N"])
        else:
            if config["variant"] == "gemv":
                facts["ROWS"] = next_pow2(M)
                facts["PDL"] = programmatic_launch()
            facts["EVEN_K"] = K % (config["BLOCK_K"] * config["SPLIT_K"]) == 0
            facts["EVEN_N"] = N % config["BLOCK_N"] == 0
            facts["INDEX_64"] = max(M * K, K * N, M * N) > _INT32_MAX
        return facts

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        M, N, K = _dims(shape)
        dt = torch_dtype(dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        a = torch.randn(M, K, generator=gen).to(device=device, dtype=dt)
        if shape.get("b_transposed", True):
            b = torch.randn(N, K, generator=gen).to(device=device, dtype=dt).t()
        else:
            b = torch.randn(K, N, generator=gen).to(device=device, dtype=dt)
        return {"a": a, "b": b, "out": torch.empty(M, N, device=device, dtype=dt)}

    def shape_of(self, inputs: dict) -> Shape:
        a, b = inputs["a"], inputs["b"]
        return {"M": a.shape[0], "N": b.shape[1], "K": a.shape[1], "b_transposed": _b_transposed(b)}

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        return matmul(inputs["a"], inputs["b"], config=config, out=inputs.get("out"))

    def reference(self, inputs: dict) -> torch.Tensor:
        return inputs["a"].double() @ inputs["b"].double()

    def call(self, a: torch.Tensor, b: torch.Tensor, *, config: Config | None = None, out=None) -> torch.Tensor:
        return matmul(a, b, config=config, out=out)

    def shape_from_call(self, a: torch.Tensor, b: torch.Tensor, **_: Any) -> Shape:
        return self.shape_of({"a": a, "b": b})

    def baseline(self, inputs: dict) -> torch.Tensor:
        return torch.matmul(inputs["a"], inputs["b"])

    def flops(self, shape: Shape) -> float:
        M, N, K = _dims(shape)
        return 2.0 * M * N * K

    def bytes(self, shape: Shape, dtype: str) -> float:
        M, N, K = _dims(shape)
        return float((M * K + K * N + M * N) * _elt(dtype))

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"M": 37, "N": 29, "K": 45},  # nothing divides anything
            {"M": 1, "N": 64, "K": 96},  # decode: one token
            {"M": 16, "N": 48, "K": 64, "b_transposed": False},  # B row-major, K divides the tile
            {"M": 70, "N": 96, "K": 160},  # several tile-rows: grouped ordering, split-K
        ]


FAMILY = GemmFamily()


def _b_transposed(b: torch.Tensor) -> bool:
    """True when B is laid out as a transposed row-major [N, K] matrix (a weight view)."""
    return b.stride(0) == 1 and b.stride(1) != 1


def matmul(
    a: torch.Tensor, b: torch.Tensor, *, config: Config | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """C = A @ B through the GEMM family.

    a [M, K], b [K, N] with any strides (b may be a transposed weight view ``W.t()``), same dtype
    (float16, bfloat16 or float32) and device. ``config`` None uses the family's default config.
    ``out`` [M, N] of a's dtype is written when given. Returns C [M, N] of a's dtype.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"matmul: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"matmul: {name} must be 2-D, got shape {tuple(t.shape)}")
    dtype = dtype_name(a.dtype)
    if b.dtype != a.dtype:
        raise TypeError(f"matmul: a is {a.dtype} but b is {b.dtype}; both must have one dtype")
    if a.device != b.device:
        raise ValueError(f"matmul: operands on different devices: a is on {a.device}, b on {b.device}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"matmul: config must be a dict or None, got {type(config).__name__}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    elif out.shape != (M, N) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"matmul: out must be [{M}, {N}] {a.dtype} on {a.device}, got {tuple(out.shape)} {out.dtype}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    b_trans = _b_transposed(b)
    resolved, module = FAMILY.resolve({"M": M, "N": N, "K": K, "b_transposed": b_trans}, dtype, config)
    launch = module.launch
    if resolved["variant"].startswith("tma"):
        # Tensor descriptors need a unit stride in the last dim: only the layouts the variant names.
        a = a if a.stride(1) == 1 else a.contiguous()
        b = b if (b_trans or b.stride(1) == 1) else b.contiguous()
        target = out if out.stride(1) == 1 and out.stride(0) == N else torch.empty_like(out, memory_format=torch.contiguous_format)
        launch(a, b, target, device_facts(a.device).num_sms)
        if target is not out:
            out.copy_(target)
        return out
    launch(a, b, out, device_facts(a.device).num_sms)
    return out
