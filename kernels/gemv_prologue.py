"""What the GEMV families with a fused prologue share (``norm_gemv``, ``silu_gemv``).

Each computes C [M, N] = f(inputs) @ W^T for M <= 4 rows (decode batches), W [N, K] a linear
layer's weight, with the GEMV of the gemm family's ``gemv`` variant: a program owns BLOCK_N columns
of C for every row, multiplies W's [BLOCK_N, BLOCK_K] tiles with the rows elementwise in float32
and sums over K once at the end. The prologue ``f`` (a norm, an activation) is computed on the fly
from the inputs as each K step loads them, so its output never goes to memory and its own kernel
launch disappears. Shapes carry at least ``{"M", "N", "K"}``; the tunables are the tile, the warps
and the pipeline depth.
"""
from __future__ import annotations

from typing import Any

import torch

from kernels.device import programmatic_launch
from kernels.family import Config, Family, Shape, next_pow2, positive_dims, tolerance, torch_dtype
from kernels.gemm import GEMV_BLOCK_K, GEMV_BLOCK_N, GEMV_MAX_M, gemv_accumulator_reject


def gemv_dims(family: str, shape: Shape) -> tuple[int, int, int]:
    """(M, N, K) of a shape, with M at most GEMV_MAX_M (``ValueError`` naming the family otherwise)."""
    M, N, K = positive_dims(family, shape, ("M", "N", "K"))
    if M > GEMV_MAX_M:
        raise ValueError(f"{family}: M={M} rows; the kernel holds every row, at most {GEMV_MAX_M}")
    return M, N, K


def check_rows(fn: str, rows: int) -> None:
    """``ValueError`` when a call brings more rows than the kernel holds."""
    if rows > GEMV_MAX_M:
        raise ValueError(f"{fn}: {rows} rows; the kernel takes at most {GEMV_MAX_M} (run the unfused operators)")


class GemvPrologueFamily(Family):
    """Space, constraints, default config and tolerance of a GEMV with a fused prologue. The
    families share one template, ``kernels/templates/gemv_prologue.py.j2``, which ``prologue``
    (the fact PROLOGUE: "rmsnorm" or "silu_mul") specialises."""

    template_file = "gemv_prologue.py.j2"
    prologue: str
    default_tile: Config  # see default_config

    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        _, N, K = gemv_dims(self.name, shape)
        torch_dtype(dtype)
        return {
            "BLOCK_N": [b for b in (*GEMV_BLOCK_N, 32) if b <= max(4, next_pow2(N))],
            "BLOCK_K": [b for b in (64, *GEMV_BLOCK_K) if b <= max(128, next_pow2(K))],
            "num_warps": [1, 2, 4, 8],
            "num_stages": [1, 2, 3, 4, 5],
        }

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        M, _, _ = gemv_dims(self.name, shape)
        return gemv_accumulator_reject(M, config["BLOCK_N"], config["BLOCK_K"], config["num_warps"])

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """``default_tile`` (the family's tuned winner at its costliest llama-3.2-1b decode shape,
        M = 1); for M > 1 its K step halved until the accumulator of M rows fits and 4 stages (the
        winners tuned at M = 2 and 4 kept their warps, shortened the K step and took 4-5 stages).

        8 columns a program, not the plain GEMV's one (``kernels.gemm.gemv_default``): every program
        recomputes the prologue over the whole row, so with one column the prologue's loads cost as
        much as the weights' (on an H200, norm_gemv at 16384x2048 took 37 us with one column, 21 us
        with 8; results/bench_engine_nvidia_h200/windows_gemv/NOTES.md)."""
        M, _, _ = gemv_dims(self.name, shape)
        space = self.space(shape, dtype)
        cfg = dict(self.default_tile)
        for key in ("BLOCK_N", "BLOCK_K"):  # no wider than the shape's space
            cfg[key] = max([b for b in space[key] if b <= cfg[key]] or [min(space[key])])
        while self.reject(shape, dtype, cfg) is not None and cfg["BLOCK_K"] > min(space["BLOCK_K"]):
            cfg["BLOCK_K"] //= 2
        if M > 1:
            cfg["num_stages"] = 4
        return cfg if self.reject(shape, dtype, cfg) is None else self.configs(shape, dtype)[0]

    def tile_facts(self, shape: Shape, config: Config) -> dict[str, Any]:
        """The template facts every such family has: the prologue, padded rows, tile, K and N
        evenness, launch (programmatic dependent launch included)."""
        M, N, K = gemv_dims(self.name, shape)
        return {
            "PROLOGUE": self.prologue,
            "ROWS": next_pow2(M),
            "BLOCK_N": config["BLOCK_N"],
            "BLOCK_K": config["BLOCK_K"],
            "EVEN_K": K % config["BLOCK_K"] == 0,
            "EVEN_N": N % config["BLOCK_N"] == 0,
            "NUM_WARPS": config["num_warps"],
            "NUM_STAGES": config["num_stages"],
            "PDL": programmatic_launch(),
        }

    def tolerance(self, dtype: str, device: torch.device | str) -> float:
        # No matrix units: float32 products stay float32 on a GPU too (no TF32 allowance).
        return 1e-5 if dtype == "float32" else tolerance(dtype, device)
