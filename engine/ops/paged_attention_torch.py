"""Paged attention in plain PyTorch (float32 arithmetic): the engine's reference attention.

Same contract as ``kernels.attention.paged``: q [T, Hq, D] packs the new query tokens of B
sequences (sequence b owns rows cu_seqlens_q[b] : cu_seqlens_q[b+1]); k_cache and v_cache
[num_blocks, block_size, Hkv, D] already hold every token of every sequence, the new ones included;
block_tables [B, max_blocks] (int) maps a sequence's logical block j to a physical block;
context_lens [B] counts each sequence's tokens in the cache. Query i of sequence b (of q_len_b) sits
at position ``context_lens[b] - q_len_b + i`` and attends to cache positions 0 .. its position
(causal), so prefill, chunked prefill and decode are one computation.

Algorithm: gather each sequence's keys and values by its block table into a contiguous
[L, Hkv, D], then softmax(q k^T * sm_scale + causal mask) v with query heads grouped over their
shared KV head (GQA). Decode sequences (one query each) are gathered and computed together; the
others one sequence at a time, so no padded [B, max_q, max_context] tensor is ever built.
"""
from __future__ import annotations

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D], q_pos [B, Lq] -> out [B, Lq, Hq, D] float32.

    Key j is visible to a query at position p when j <= p.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf = q.float().reshape(B, Lq, Hkv, group, D)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, k.float()) * sm_scale
    visible = torch.arange(Lk, device=q.device)[None, None, :] <= q_pos[:, :, None]  # [B, Lq, Lk]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float()).reshape(B, Lq, Hq, D)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D], tables [B, n] -> [B, n * block_size, Hkv, D]."""
    blocks = cache[tables]  # [B, n, block_size, Hkv, D]
    return blocks.reshape(tables.shape[0], -1, *cache.shape[2:])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    *,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of packed new queries against the paged cache; out [T, Hq, D] in q's dtype."""
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention: Hq={q.shape[1]} is not a multiple of Hkv={k_cache.shape[2]}")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = cu_seqlens_q[:-1].tolist()
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    ctx = context_lens.tolist()

    decode = [b for b, n in enumerate(q_lens) if n == 1]
    if decode:
        rows = torch.tensor([starts[b] for b in decode], device=q.device)
        n_blocks = -(-max(ctx[b] for b in decode) // block_size)
        tables = block_tables[decode, :n_blocks]
        q_pos = torch.tensor([[ctx[b] - 1] for b in decode], device=q.device)
        o = _attend(q[rows][:, None], _gather(k_cache, tables), _gather(v_cache, tables), q_pos, scale)
        out[rows] = o[:, 0].to(q.dtype)
    for b, n in enumerate(q_lens):
        if n <= 1:
            continue
        s, c = starts[b], ctx[b]
        tables = block_tables[b : b + 1, : -(-c // block_size)]
        q_pos = torch.arange(c - n, c, device=q.device)[None]
        o = _attend(q[None, s : s + n], _gather(k_cache, tables), _gather(v_cache, tables), q_pos, scale)
        out[s : s + n] = o[0].to(q.dtype)
    return out
