"""Prefetch of the leading bytes of up to two tensors from device memory into L2 (Hopper and later).

A decode step at batch 1 streams the weights (about 2.5 GB for llama-3.2-1b) through GEMVs, but
between the QKV projection and the output projection run kernels that barely use the memory bus:
rope, attention over a short context, the split-KV merge. A prefetch issued after the QKV GEMV lets
the memory system stream the next GEMVs' weights into L2 during them, so that the output and
gate/up projections then read part of their weights from L2.

Algorithm: the bytes to fetch (``a``'s first ``a_bytes``, then ``b``'s first ``b_bytes``) are cut
into CHUNK-byte chunks; each of LANES lanes of a program issues one
``cp.async.bulk.prefetch.L2.global [address], size`` for its chunk. The instruction is asynchronous
and holds no registers or shared memory, so the programs exit at once and the memory system works
through the requests while the next kernels run. It is a hint: it changes no value, and nothing
waits for it. Without a GPU of compute capability 9.0 or more (the interpreter included) nothing
is launched.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

CHUNK = 16384  # bytes per prefetch instruction
LANES = 32  # prefetches per program (one warp)


@triton.jit
def l2_prefetch_kernel(a_addr, a_bytes, b_addr, b_bytes, a_chunks, total_chunks,
                       CHUNK: tl.constexpr, LANES: tl.constexpr):
    # Chunk i < a_chunks is a's, the rest b's; lanes past the end repeat the last chunk (harmless).
    i = tl.minimum(tl.program_id(0) * LANES + tl.arange(0, LANES), total_chunks - 1).to(tl.int64)
    in_b = i >= a_chunks
    off = tl.where(in_b, i - a_chunks, i) * CHUNK
    addr = tl.where(in_b, b_addr, a_addr) + off
    size = tl.minimum(tl.where(in_b, b_bytes, a_bytes) - off, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1,
    )


def supported(t: torch.Tensor) -> bool:
    """Whether a prefetch of ``t`` launches: a CUDA tensor on a GPU of compute capability >= 9.0
    (the bulk prefetch instruction), not under Triton's interpreter."""
    return (t.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


def _region(name: str, t: torch.Tensor | None, nbytes: int) -> tuple[int, int]:
    """(address, bytes) of the first ``nbytes`` of ``t`` (clipped to its size, rounded down to 16)."""
    if t is None or nbytes <= 0:
        return 0, 0
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"l2_prefetch: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"l2_prefetch: {name} must be contiguous (its leading bytes are fetched)")
    if t.data_ptr() % 16:
        raise ValueError(f"l2_prefetch: {name}'s address is not 16-byte aligned")
    size = min(nbytes, t.numel() * t.element_size())
    return t.data_ptr(), size - size % 16


def l2_prefetch(a: torch.Tensor, a_bytes: int, b: torch.Tensor | None = None, b_bytes: int = 0) -> None:
    """Start fetching the first ``a_bytes`` of ``a`` and the first ``b_bytes`` of ``b`` (contiguous
    tensors on one device) into L2, asynchronously on the current stream. A hint: no-op where
    :func:`supported` is false; sizes past a tensor's end are clipped to it."""
    a_addr, a_n = _region("a", a, a_bytes)
    b_addr, b_n = _region("b", b, b_bytes)
    if b is not None and b.device != a.device:
        raise ValueError(f"l2_prefetch: a is on {a.device}, b on {b.device}")
    if not supported(a):
        return
    a_chunks, b_chunks = -(-a_n // CHUNK), -(-b_n // CHUNK)
    total = a_chunks + b_chunks
    if total == 0:
        return
    if a_chunks == 0:  # only b: let it play a's part
        a_addr, a_n, a_chunks, b_addr, b_n = b_addr, b_n, b_chunks, 0, 0
    l2_prefetch_kernel[(triton.cdiv(total, LANES),)](a_addr, a_n, b_addr, b_n, a_chunks, total,
                                                    CHUNK=CHUNK, LANES=LANES, num_warps=1)
