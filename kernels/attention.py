"""Direct calls of the attention families: varlen prefill and paged attention.

    out = kernels.attention.prefill(q, k, v, cu_seqlens, max_seqlen, causal=True)
    out = kernels.attention.paged(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q)

Both validate their arguments (``TypeError`` for a wrong type or dtype, ``ValueError`` for wrong
shapes, devices or values, each message naming the argument), pick the family's default config when
``config`` is None (no cache lookup happens in kernels/; tuned dispatch lives in autotune/), and
launch the emitted module of that (shape facts, dtype, config). The checks that read values on the
device (cu_seqlens, context lengths, block tables) cost one host synchronisation per call; they are
skipped with ``check_values=False`` (timing loops, an engine that built the metadata itself) and
while a CUDA graph is being captured, where reading device memory is impossible.

The kernels themselves are in kernels/templates/attention_prefill.py.j2 and attention_paged.py.j2;
the families (spaces, defaults, inputs, references, cost models) in kernels/attention_prefill.py and
kernels/attention_paged.py.
"""
from __future__ import annotations

import math
from typing import Any

import torch

import kernels
from kernels.family import Config, Shape, dtype_name, next_pow2
from kernels.kv_store import check_slots, check_store
from kernels.rope import check_cos_sin

MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 256  # tokens per cache block


# --- argument checks ------------------------------------------------------------------------------
def _tensor(fn: str, name: str, t: Any, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{fn}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _index_tensor(fn: str, name: str, t: Any, dim: int, device: torch.device) -> torch.Tensor:
    _tensor(fn, name, t, dim)
    if t.dtype != torch.int32:
        raise TypeError(f"{fn}: {name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but q is on {device}")
    return t


def _same_float(fn: str, q: torch.Tensor, **others: torch.Tensor) -> str:
    """q's dtype name after checking that ``others`` share q's dtype and device."""
    dtype = dtype_name(q.dtype)
    for name, t in others.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: q is {q.dtype} but {name} is {t.dtype}; they must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{fn}: q is on {q.device} but {name} is on {t.device}")
    return dtype


def _heads(fn: str, hq: int, hkv: int, d: int, d_kv: int, kv_name: str) -> None:
    if d != d_kv:
        raise ValueError(f"{fn}: head dims differ: q has {d}, {kv_name} has {d_kv}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim {d} is outside 1..{MAX_HEAD_DIM}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{fn}: query heads Hq={hq} are not a multiple of KV heads Hkv={hkv}")


def _positive_int(fn: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be >= 1, got {value}")
    return value


def _scale(fn: str, sm_scale: Any, head_dim: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"{fn}: sm_scale must be a float or None, got {type(sm_scale).__name__}")
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"{fn}: sm_scale must be a positive finite number, got {sm_scale}")
    return float(sm_scale)


def _out(fn: str, out: Any, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"{fn}: out must be {list(q.shape)} {q.dtype} on {q.device} like q, "
            f"got {list(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def _capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream (no host reads allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_offsets(fn: str, name: str, cu: torch.Tensor) -> None:
    if cu.shape[0] < 2:
        raise ValueError(f"{fn}: {name} must hold B+1 >= 2 offsets, got shape {tuple(cu.shape)}")


def _lengths(cu: torch.Tensor) -> torch.Tensor:
    """Per-sequence lengths [B] (int64) of the offsets ``cu`` [B+1]."""
    return cu[1:].long() - cu[:-1].long()


def _raise_on_values(fn: str, checks: list[tuple[torch.Tensor, str]], extra: list[torch.Tensor]) -> list[int]:
    """Evaluate boolean device checks (True = bad) and ``extra`` int scalars with one host sync.

    Raises ``ValueError`` with the message of the first failed check; returns the ``extra`` values.
    """
    values = torch.stack([c.reshape(()).long() for c, _ in checks] + [e.reshape(()).long() for e in extra]).tolist()
    for bad, (_, message) in zip(values, checks):
        if bad:
            raise ValueError(f"{fn}: {message}")
    return values[len(checks):]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (what the kernels index), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# --- prefill --------------------------------------------------------------------------------------
def prefill_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                  *, causal: bool = True) -> Shape:
    """The attention_prefill shape dict of a :func:`prefill` call, after the checks that need no device read."""
    fn = "prefill"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(fn, name, t, 3)
    _same_float(fn, q, k=k, v=v)
    _index_tensor(fn, "cu_seqlens", cu_seqlens, 1, q.device)
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k {list(k.shape)} and v {list(v.shape)} must have one shape")
    T, hq, d = q.shape
    if k.shape[0] != T:
        raise ValueError(f"{fn}: q has {T} tokens but k and v have {k.shape[0]}")
    _heads(fn, hq, k.shape[1], d, k.shape[2], "k")
    _positive_int(fn, "max_seqlen", max_seqlen)
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    _check_offsets(fn, "cu_seqlens", cu_seqlens)
    return {"batch": cu_seqlens.shape[0] - 1, "seqlen": max_seqlen, "heads_q": hq, "heads_kv": k.shape[1],
            "head_dim": d, "causal": causal}


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    config: Config | None = None,
    out: torch.Tensor | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (FlashAttention-2 forward).

    q [T, Hq, D], k and v [T, Hkv, D] (Hq a multiple of Hkv; query head h reads KV head
    h // (Hq / Hkv)), same dtype (float16, bfloat16, float32) and device, unit stride along D
    preferred (other layouts are copied). cu_seqlens [B+1] int32: sequence b owns tokens
    cu_seqlens[b] .. cu_seqlens[b+1]; it starts at 0, never decreases and ends at T. max_seqlen:
    an int >= the longest sequence (sets the grid). causal: token i sees tokens 0..i of its own
    sequence, else all of them. sm_scale: default 1/sqrt(D). config: None for the family's default.
    out [T, Hq, D] of q's dtype is written when given. check_values: read cu_seqlens back to check
    it (one host sync). Returns out [T, Hq, D].
    """
    fn = "prefill"
    shape = prefill_shape(q, k, v, cu_seqlens, max_seqlen, causal=causal)
    scale = _scale(fn, sm_scale, q.shape[2])
    out = _out(fn, out, q)
    T = q.shape[0]
    if check_values and not _capturing(q):
        lens = _lengths(cu_seqlens)
        _raise_on_values(fn, [
            (cu_seqlens[0] != 0, "cu_seqlens must start at 0"),
            ((lens < 0).any(), "cu_seqlens must be non-decreasing"),
            (cu_seqlens[-1] != T, f"cu_seqlens must end at the token count T={T}"),
            (lens.max() > max_seqlen, f"max_seqlen={max_seqlen} is shorter than the longest sequence"),
        ], [])
    if T == 0:
        return out
    launch = kernels.get_family("attention_prefill").resolve(shape, dtype_name(q.dtype), config)[1].launch
    target = _unit_last(out)
    launch(_unit_last(q), _unit_last(k), _unit_last(v), cu_seqlens, target, max_seqlen, scale)
    if target is not out:
        out.copy_(target)
    return out


# --- paged ----------------------------------------------------------------------------------------
def _paged_structure(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q) -> Shape:
    """Checks of :func:`paged`'s arguments that need no device read; the shape without context_len."""
    fn = "paged"
    _tensor(fn, "q", q, 3)
    _tensor(fn, "k_cache", k_cache, 4)
    _tensor(fn, "v_cache", v_cache, 4)
    _same_float(fn, q, k_cache=k_cache, v_cache=v_cache)
    _index_tensor(fn, "block_tables", block_tables, 2, q.device)
    _index_tensor(fn, "cu_seqlens_q", cu_seqlens_q, 1, q.device)
    _index_tensor(fn, "context_lens", context_lens, 1, q.device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"paged: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} must have one shape")
    _, block_size, hkv, d_kv = k_cache.shape
    hq, d = q.shape[1], q.shape[2]
    _heads(fn, hq, hkv, d, d_kv, "k_cache")
    if block_size < 1 or block_size & (block_size - 1) or block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"paged: block size {block_size} (k_cache.shape[1]) must be a power of two up to "
                         f"{MAX_BLOCK_SIZE}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"paged: {name} must have unit stride along the head dim (a cache is never copied)")
    batch = block_tables.shape[0]
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"paged: cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, block_tables has {batch} rows; "
                         f"expected B+1 = {batch + 1}")
    if context_lens.shape[0] != batch:
        raise ValueError(f"paged: context_lens has {context_lens.shape[0]} entries for B={batch} sequences")
    _positive_int(fn, "max_seqlen_q", max_seqlen_q)
    _check_offsets(fn, "cu_seqlens_q", cu_seqlens_q)
    return {"batch": batch, "query_len": max_seqlen_q, "heads_q": hq, "heads_kv": hkv, "head_dim": d,
            "block_size": block_size}


def _paged_values(q, k_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q) -> int:
    """The value checks of :func:`paged` (one host sync); returns the longest context."""
    T = q.shape[0]
    num_blocks, block_size = k_cache.shape[:2]
    max_blocks = block_tables.shape[1]
    q_lens = _lengths(cu_seqlens_q)
    ctx = context_lens.long()
    blocks_used = (ctx + block_size - 1) // block_size
    used = torch.arange(max_blocks, device=ctx.device)[None, :] < blocks_used[:, None]
    bad_ids = used & ((block_tables < 0) | (block_tables >= num_blocks))
    (longest,) = _raise_on_values("paged", [
        (cu_seqlens_q[0] != 0, "cu_seqlens_q must start at 0"),
        ((q_lens < 0).any(), "cu_seqlens_q must be non-decreasing"),
        (cu_seqlens_q[-1] != T, f"cu_seqlens_q must end at the token count T={T}"),
        (q_lens.max() > max_seqlen_q, f"max_seqlen_q={max_seqlen_q} is shorter than the longest query"),
        ((q_lens > ctx).any(), "a query is longer than its context (context_lens < query length)"),
        ((blocks_used > max_blocks).any(),
         f"block_tables has {max_blocks} blocks per sequence, too short for a context in context_lens "
         f"(block size {block_size})"),
        (bad_ids.any(), f"block_tables holds a block index outside 0..{num_blocks - 1} within a context"),
    ], [ctx.max()])
    return int(longest)


def paged_shape(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_seqlen_q: int,
                *, max_context_len: int | None = None, k_new: torch.Tensor | None = None, **_: Any) -> Shape:
    """The attention_paged shape dict of a :func:`paged` call (``"rope": True`` with ``k_new``).

    context_len is ``max_context_len`` when given, else the longest context read from the device
    (one sync), or while a CUDA graph is captured the block table's capacity.
    """
    shape = _paged_structure(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q)
    if k_new is not None:
        shape["rope"] = True
    if max_context_len is not None:
        longest = _positive_int("paged", "max_context_len", max_context_len)
    elif _capturing(q):
        longest = block_tables.shape[1] * shape["block_size"]
    else:
        longest = int(context_lens.max())
    return {**shape, "context_len": max(longest, shape["query_len"])}


def _check_new_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seqlen_q: int,
                  new_kv: dict[str, torch.Tensor | None]) -> bool:
    """Checks of :func:`paged`'s fused rotation and store (all of k_new, v_new, cos_sin, slot_mapping, or
    none); whether they are given."""
    fn = "paged"
    given = [name for name, t in new_kv.items() if t is not None]
    if not given:
        return False
    if len(given) != len(new_kv):
        raise ValueError(f"{fn}: the fused rope and KV store need k_new, v_new, cos_sin and slot_mapping; "
                         f"got only {given}")
    if max_seqlen_q != 1:
        raise ValueError(f"{fn}: the fused rope and KV store serve decode only (max_seqlen_q 1), got {max_seqlen_q}")
    k_new, v_new, cos_sin = new_kv["k_new"], new_kv["v_new"], new_kv["cos_sin"]
    _tensor(fn, "k_new", k_new, 3)
    T, hq, d = q.shape
    if k_new.shape != (T, k_cache.shape[2], d):
        raise ValueError(f"{fn}: k_new must be [T, Hkv, D] = {[T, k_cache.shape[2], d]}, got {list(k_new.shape)}")
    check_store(fn, k_new, v_new, k_cache, v_cache, new_kv["slot_mapping"])
    _same_float(fn, q, k_new=k_new)
    check_cos_sin(fn, "cos_sin", cos_sin, q)
    check_slots(fn, new_kv["slot_mapping"], k_cache.shape[0] * k_cache.shape[1])
    return True


def paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    *,
    sm_scale: float | None = None,
    config: Config | None = None,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    check_values: bool = True,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cos_sin: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of new query tokens over a paged KV cache (decode, chunked prefill, cached prefix).

    q [T, Hq, D] packed new query tokens; k_cache and v_cache [num_blocks, block_size, Hkv, D]
    (block_size a power of two, unit stride along D), same dtype and device as q; block_tables
    [B, max_blocks] int32: position p of sequence b is in block block_tables[b, p // block_size],
    slot p % block_size; cu_seqlens_q [B+1] int32 offsets of each sequence's query tokens;
    context_lens [B] int32 cached tokens per sequence, the new ones included (already written).
    Query token i of sequence b sits at position context_lens[b] - q_len_b + i and attends to
    positions 0 .. its own. max_seqlen_q: an int >= the longest query (1 selects the decode
    variants). max_context_len: optional bound on context_lens that picks the default config.
    check_values: read the metadata back to check it (one host sync; it also gives the longest
    context). Without either, the default config is picked for the block table's capacity.
    Returns out [T, Hq, D].

    Decode with the rotary embedding and the KV store fused in (the engine's decode step): with
    k_new and v_new [T, Hkv, D] (the step's new keys and values, of q's dtype, unit stride along D;
    views of a fused QKV output work), cos_sin [max_pos, D] (``kernels.rope.rope_cache``: cos of
    the D/2 angles, then sin; float32 or q's dtype) and slot_mapping [T] (int32 or int64; negative:
    store nothing), all four or none, and max_seqlen_q 1: q holds unrotated queries; q and k_new are
    rotated by the query's position context_lens[b] - 1 (Hugging Face's rotate_half), k_new and
    v_new are stored into the caches at the slots, and the newest position is attended from them.
    q, k_new and v_new are left as they were. The caches need not hold the newest position before.
    """
    fn = "paged"
    shape = _paged_structure(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q)
    new_kv = {"k_new": k_new, "v_new": v_new, "cos_sin": cos_sin, "slot_mapping": slot_mapping}
    if _check_new_kv(q, k_cache, v_cache, max_seqlen_q, new_kv):
        shape["rope"] = True
    scale = _scale(fn, sm_scale, q.shape[2])
    out = _out(fn, out, q)
    longest = block_tables.shape[1] * shape["block_size"]
    if check_values and not _capturing(q):
        longest = _paged_values(q, k_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q)
    if max_context_len is not None:
        longest = _positive_int(fn, "max_context_len", max_context_len)
    if q.shape[0] == 0:
        return out
    # The default config (split count, tile) depends on the context only through its power-of-two
    # bucket, so that a context growing by one token per step does not create a launcher per step.
    shape["context_len"] = next_pow2(max(longest, shape["query_len"]))
    launch = kernels.get_family("attention_paged").resolve(shape, dtype_name(q.dtype), config)[1].launch
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    target = _unit_last(out)
    rope = () if k_new is None else (k_new, v_new, cos_sin.contiguous(), slot_mapping)
    launch(_unit_last(q), k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, target, max_seqlen_q, scale,
           *rope)
    if target is not out:
        out.copy_(target)
    return out
