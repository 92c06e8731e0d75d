"""The device half of one step of a greedy decode window: each row's token from its logits' chunk
maxima, and the decode step's inputs advanced to the next position, in one launch.

Inputs, for R rows (decode sequences, padding rows included):
- best [R, C] (the logits' float dtype) and where [R, C] (int64): the maximum of each of the C
  equal chunks of a logits row [C * width] and its index within the chunk, the first of equal maxima
  (the first pass: :func:`chunk_maxima` here, or ``torch.max`` over ``logits.reshape(R, C, width)``);
- the padded decode path's static buffers: ids, positions, slots [R] int64, context_lens [R] int32,
  block_tables [R, W] int32.

Per row (one program): token = where[c] + c * width for c the first chunk holding the row's maximum,
which is ``argmax``'s first maximum of the whole row; it is written to ``tokens`` [R], or with a
step counter ``steps`` [R] int32 to tokens[steps[row] % W, row] of ``tokens`` [W, R], the counter then
growing by one (a decode window's steps counted on the device, so that one captured graph serves
every step of the window; past W it wraps, which a window of at most W steps never does). With ``advance``,
a real row (slot >= 0) moves to its next position p + 1: ids = token, positions and context_lens
grow by one, and slots = block_tables[row, (p + 1) // block_size] * block_size + (p + 1) % block_size
(its blocks were grown for the window beforehand). Padding rows (slot -1) stay as they are, so
they keep writing nothing to the cache. A step thus needs no host work between the forward passes
of a window.

Both kernels launch with programmatic dependent launch where the device has it
(``kernels.device.programmatic_launch``): they end a decode graph, after the LM head. (PyTorch's
reduction for the first pass took 6.9 us of a batch-1 decode graph on an H200:
results/bench_engine_nvidia_h200/rope_attention/bench/kernel_breakdown_graph_timeline.csv.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import checks
from kernels.device import programmatic_launch
from kernels.family import next_pow2

MAX_CHUNK_BLOCK = 1024  # logits a chunk_maxima program loads at once; longer chunks loop


@triton.jit
def chunk_maxima_kernel(logits_ptr, stride_r, width, best_ptr, where_ptr, C, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    """Grid (R, C): the maximum of chunk c of row r, logits[r, c * width : (c + 1) * width], and its
    first index within the chunk, BLOCK logits at a time (a later tile replaces the running maximum
    only when strictly larger, so the first of equal maxima stays)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_wait()  # launched early: the logits are the kernel before's output
        tl.extra.cuda.gdc_launch_dependents()
    base = logits_ptr + row.to(tl.int64) * stride_r + chunk.to(tl.int64) * width
    offs = tl.arange(0, BLOCK)
    x = tl.load(base + offs, mask=offs < width, other=-float("inf"))
    top, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    at = at.to(tl.int64)
    for start in range(BLOCK, width, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < width, other=-float("inf"))
        m, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = m > top
        at = tl.where(better, start + i.to(tl.int64), at)
        top = tl.where(better, m, top)
    tl.store(best_ptr + row * C + chunk, top)
    tl.store(where_ptr + row * C + chunk, at)


def chunk_maxima(logits: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(best [R, C], where [R, C] int64, width) of logits [R, V] (any float dtype, unit last stride) cut
    into C = ``chunks`` chunks of width V / C: each chunk's maximum and the index within the chunk of
    its first occurrence, as ``logits.reshape(R, C, width).max(-1)`` gives them, in one launch of R x C
    programs (PDL where the device has it)."""
    fn = "chunk_maxima"
    checks.tensor(fn, "logits", logits, 2)
    checks.float_dtype(fn, "logits", logits)
    checks.unit_last_stride(fn, "logits", logits)
    R, V = logits.shape
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1 or V % chunks:
        raise ValueError(f"{fn}: chunks must be a positive int dividing the vocabulary V={V}, got {chunks!r}")
    width = V // chunks
    best = logits.new_empty(R, chunks)
    where = torch.empty(R, chunks, dtype=torch.int64, device=logits.device)
    if R:
        pdl = programmatic_launch()
        chunk_maxima_kernel[(R, chunks)](logits, logits.stride(0), width, best, where, chunks,
                                         BLOCK=min(next_pow2(width), MAX_CHUNK_BLOCK), PDL=pdl, num_warps=4,
                                         **({"launch_pdl": True} if pdl else {}))
    return best, where, width


@triton.jit
def greedy_advance_kernel(best_ptr, where_ptr, C, width, tokens_ptr, tokens_stride, tokens_rows, steps_ptr, ids_ptr,
                          pos_ptr, ctx_ptr, slot_ptr, bt_ptr, bt_stride, bt_width, block_size, ADVANCE: tl.constexpr,
                          COUNTED: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # launched early: best and where are the kernel before's output
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.arange(0, BLOCK_C)
    best = tl.load(best_ptr + row * C + offs, mask=offs < C, other=-float("inf"))
    top = tl.max(best, axis=0)
    chunk = tl.min(tl.where(best == top, offs, BLOCK_C), axis=0)  # the first chunk with the maximum
    token = tl.load(where_ptr + row * C + chunk) + chunk.to(tl.int64) * width
    if COUNTED:
        step = tl.load(steps_ptr + row)
        tl.store(tokens_ptr + (step % tokens_rows).to(tl.int64) * tokens_stride + row, token)
        tl.store(steps_ptr + row, step + 1)
    else:
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
    steps: torch.Tensor | None = None,
) -> None:
    """Write each row's greedy token into ``tokens`` [R] (int64), or with ``steps`` [R] (int32) into
    ``tokens`` [W, R] at each row's step (then counted up), and, with ``advance``, move the real rows'
    ids, positions, context_lens and slots [R] to their next decode step (module docstring)."""
    fn = "greedy_advance"
    checks.tensor(fn, "best", best, 2)
    R, C = best.shape
    checks.float_dtype(fn, "best", best)
    token_shape = (R,) if steps is None else (tokens.shape[0] if tokens.dim() == 2 else 0, R)
    expected = {"where": (where, torch.int64, (R, C)), "tokens": (tokens, torch.int64, token_shape),
                "ids": (ids, torch.int64, (R,)), "positions": (positions, torch.int64, (R,)),
                "slots": (slots, torch.int64, (R,)), "context_lens": (context_lens, torch.int32, (R,)),
                "block_tables": (block_tables, torch.int32, (R, block_tables.shape[-1]))}
    if steps is not None:
        expected["steps"] = (steps, torch.int32, (R,))
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
    if steps is not None and tokens.shape[0] < 1:
        raise ValueError(f"{fn}: tokens [W, R] needs W >= 1 rows for the steps, got {tuple(tokens.shape)}")
    if block_size < 1 or width < 1:
        raise ValueError(f"{fn}: block_size ({block_size}) and width ({width}) must be positive")
    if R == 0:
        return
    counted, pdl = steps is not None, programmatic_launch()
    greedy_advance_kernel[(R,)](best, where, C, width, tokens, tokens.stride(0) if counted else 0,
                                tokens.shape[0] if counted else 1, steps if counted else ids, ids, positions,
                                context_lens, slots, block_tables, block_tables.stride(0), block_tables.shape[1],
                                block_size, ADVANCE=advance, COUNTED=counted, BLOCK_C=next_pow2(C), PDL=pdl,
                                num_warps=1, **({"launch_pdl": True} if pdl else {}))
