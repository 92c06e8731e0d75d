"""The device half of one step of a greedy decode window: each row's token from its logits' chunk
maxima, and the decode step's inputs advanced to the next position, in one launch.

Inputs, for R rows (decode sequences, padding rows included):
- best [R, C] (the logits' float dtype) and where [R, C] (int64): the maximum of each of the C
  equal chunks of a logits row [C * width] and its index within the chunk, the first of equal maxima
  (the first pass, ``torch.max`` over ``logits.reshape(R, C, width)``);
- the padded decode path's static buffers: ids, positions, slots [R] int64, context_lens [R] int32,
  block_tables [R, W] int32.

Per row (one program): token = where[c] + c * width for c the first chunk holding the row's maximum,
which is ``argmax``'s first maximum of the whole row; it is written to ``tokens``. With ``advance``,
a real row (slot >= 0) moves to its next position p + 1: ids = token, positions and context_lens
grow by one, and slots = block_tables[row, (p + 1) // block_size] * block_size + (p + 1) % block_size
(its blocks were grown for the window beforehand). Padding rows (slot -1) stay as they are, so
they keep writing nothing to the cache. A step thus needs no host work between the forward passes
of a window.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import checks
from kernels.family import next_pow2


@triton.jit
def greedy_advance_kernel(best_ptr, where_ptr, C, width, tokens_ptr, ids_ptr, pos_ptr, ctx_ptr, slot_ptr,
                          bt_ptr, bt_stride, bt_width, block_size, ADVANCE: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    best = tl.load(best_ptr + row * C + offs, mask=offs < C, other=-float("inf"))
    top = tl.max(best, axis=0)
    chunk = tl.min(tl.where(best == top, offs, BLOCK_C), axis=0)  # the first chunk with the maximum
    token = tl.load(where_ptr + row * C + chunk) + chunk.to(tl.int64) * width
    tl.store(tokens_ptr + row, token)
    if ADVANCE:
        slot = tl.load(slot_ptr + row)
        if slot >= 0:
            p = tl.load(pos_ptr + row) + 1
            # Clamped, not read past the table, should a caller advance beyond the blocks it grew.
            block = tl.load(bt_ptr + row * bt_stride + tl.minimum(p // block_size, bt_width - 1)).to(tl.int64)
            tl.store(ids_ptr + row, token)
            tl.store(pos_ptr + row, p)
            tl.store(ctx_ptr + row, tl.load(ctx_ptr + row) + 1)
            tl.store(slot_ptr + row, block * block_size + p % block_size)


def greedy_advance(
    best: torch.Tensor,
    where: torch.Tensor,
    width: int,
    tokens: torch.Tensor,
    *,
    advance: bool,
    ids: torch.Tensor,
    positions: torch.Tensor,
    context_lens: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
) -> None:
    """Write each row's greedy token into ``tokens`` [R] (int64) and, with ``advance``, move the real
    rows' ids, positions, context_lens and slots [R] to their next decode step (module docstring)."""
    fn = "greedy_advance"
    checks.tensor(fn, "best", best, 2)
    R, C = best.shape
    checks.float_dtype(fn, "best", best)
    expected = {"where": (where, torch.int64, (R, C)), "tokens": (tokens, torch.int64, (R,)),
                "ids": (ids, torch.int64, (R,)), "positions": (positions, torch.int64, (R,)),
                "slots": (slots, torch.int64, (R,)), "context_lens": (context_lens, torch.int32, (R,)),
                "block_tables": (block_tables, torch.int32, (R, block_tables.shape[-1]))}
    for name, (t, dtype, shape) in expected.items():
        checks.tensor(fn, name, t, len(shape))
        if t.dtype != dtype:
            raise TypeError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {shape}")
        checks.unit_last_stride(fn, name, t)
    checks.same_device(fn, **{name: t for name, (t, _, _) in expected.items()}, best=best)
    for name, t in (("best", best), ("where", where)):
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")
    if block_size < 1 or width < 1:
        raise ValueError(f"{fn}: block_size ({block_size}) and width ({width}) must be positive")
    if R == 0:
        return
    greedy_advance_kernel[(R,)](best, where, C, width, tokens, ids, positions, context_lens, slots,
                                block_tables, block_tables.stride(0), block_tables.shape[1], block_size,
                                ADVANCE=advance, BLOCK_C=next_pow2(C), num_warps=1)
