"""The attention_paged family: new query tokens against a paged KV cache through a block table.

Shape dicts are ``{"batch", "query_len", "context_len", "heads_q", "heads_kv", "head_dim",
"block_size"}``: ``query_len`` is the longest query (``max_seqlen_q``; 1 is decode) and
``context_len`` the longest context. Structural variants (the categorical parameter ``variant``):
- ``decode`` (query_len 1): one program per (sequence, KV head's query heads), whole context;
- ``decode_split`` (query_len 1): the context split into SPLIT slices over programs
  (flash-decoding), merged by log-sum-exp in a second kernel;
- ``general``: blocks of BLOCK_Q query tokens with causal masking (chunked prefill, prefill over a
  cached prefix, mixed batches of chunks and decode tokens).
Tunables: TILE (keys per step along the context), SPLIT, HEADS (query heads of one KV head per
program), BLOCK_Q (general only), num_warps, num_stages. The generator specialises on the head dim,
GQA group and cache block size.

A decode shape with ``"rope": True`` is the engine's decode attention with the rotary embedding and
the KV store fused in (the decode variants only): q and the step's new keys arrive unrotated, are
rotated by the query's position (context_lens - 1), the new keys and values are stored into the
caches, and the newest position joins the softmax from registers (see the template's docstring and
:func:`kernels.attention.paged`'s k_new, v_new, cos_sin and slot_mapping). Its space is the decode
variants' of the same shape without rope; a cache holding no rope entry gives the tuned dispatch
that shape's config as the nearest match, at distance 0.

The template is ``kernels/templates/attention_paged.py.j2``; the direct call is
:func:`kernels.attention.paged`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from kernels import attention
from kernels.attention_prefill import MAX_FP32_REGS, head_dim_pad, nearest_config, sdpa_reference
from kernels.device import device_facts, programmatic_launch
from kernels.family import Config, Family, Shape, next_pow2, positive_dims, torch_dtype
from kernels.rope import rope_cache, rotate

_KEYS = ("batch", "query_len", "context_len", "heads_q", "heads_kv", "head_dim", "block_size")
_MAX_ACC_REGS = 192  # float32 accumulator + score registers per thread before spilling
_MAX_ROWS = 128


def _elt(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def _dims(shape: Shape) -> tuple[int, int, int, int, int, int, int]:
    """(batch, query_len, context_len, Hq, Hkv, D, block_size) of a shape dict, checked."""
    B, lq, lc, hq, hkv, d, bs = positive_dims("attention_paged", shape, _KEYS)
    if lq > lc:
        raise ValueError(f"attention_paged: query_len {lq} exceeds context_len {lc}")
    if hq % hkv:
        raise ValueError(f"attention_paged: heads_q={hq} is not a multiple of heads_kv={hkv}")
    if d > attention.MAX_HEAD_DIM:
        raise ValueError(f"attention_paged: head_dim {d} exceeds {attention.MAX_HEAD_DIM}")
    if bs & (bs - 1):
        raise ValueError(f"attention_paged: block_size {bs} is not a power of two")
    return B, lq, lc, hq, hkv, d, bs


def _rope(shape: Shape) -> bool:
    """Whether ``shape`` is the rope-fused decode (``ValueError`` unless it is a decode shape of even head dim)."""
    if not shape.get("rope", False):
        return False
    if shape["query_len"] != 1:
        raise ValueError(f"attention_paged: rope is fused only into decode (query_len 1), got query_len {shape['query_len']}")
    if shape["head_dim"] % 2:
        raise ValueError(f"attention_paged: rope needs an even head_dim, got {shape['head_dim']}")
    return True


def _rows(config: Config) -> int:
    """Rows of the score tile: BLOCK_Q tokens x the heads padded to a power of two, at least 16."""
    return max(16, config["BLOCK_Q"] * next_pow2(config["HEADS"]))


def _lazy_sum(config: Config) -> bool:
    """Whether a program keeps its softmax row sums per key column until the last tile: when its
    warps split the score tile along the keys (under 16 rows per warp), where a per-tile row sum
    would cross warps (the template's ``row_sum_update``)."""
    return _rows(config) < 16 * config["num_warps"]


class PagedFamily(Family):
    name = "attention_paged"
    template_file = "attention_paged.py.j2"
    template_version = 3

    # --- search space ---------------------------------------------------------------------------
    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        _, lq, lc, hq, hkv, _, _ = _dims(shape)
        torch_dtype(dtype)
        group = hq // hkv
        decode = lq == 1
        rope = _rope(shape)
        return {
            "variant": (["decode", "decode_split"] + ([] if rope else ["general"])) if decode else ["general"],
            "TILE": [t for t in (16, 32, 64, 128, 256) if t <= max(16, next_pow2(lc))],
            "SPLIT": [1] + [s for s in (2, 4, 8, 16, 32, 64) if decode and s <= math.ceil(lc / 16)],
            "HEADS": [h for h in range(1, group + 1) if group % h == 0],
            "BLOCK_Q": [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= next_pow2(lq)],
            # Decode programs are small (a few heads' rows): 1 or 2 warps leave room for more programs
            # per SM, and one warp holds whole score rows (no reduction crosses warps).
            "num_warps": [1, 2, 4, 8] if decode else [4, 8],
            "num_stages": [2, 3, 4],
        }

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        _, lq, lc, _, _, d, _ = _dims(shape)
        d = head_dim_pad(d)
        variant, tile, split = config["variant"], config["TILE"], config["SPLIT"]
        warps, stages = config["num_warps"], config["num_stages"]
        if (variant == "decode_split") != (split > 1):
            return "SPLIT > 1 goes with the decode_split variant and only with it"
        if split > math.ceil(lc / tile):
            return f"SPLIT={split} slices exceed the {math.ceil(lc / tile)} tiles of {tile} in the context"
        rows = _rows(config)
        heads_pad = next_pow2(config["HEADS"])
        if rows > _MAX_ROWS:
            return f"{rows} rows per program exceed {_MAX_ROWS}"
        if config["BLOCK_Q"] * heads_pad < 16 and config["BLOCK_Q"] < next_pow2(lq):
            return "rows padded to 16 while more query tokens could fill them"
        score_tiles = 2 if _lazy_sum(config) else 1  # the scores, and the per-column row sums
        regs = (rows * d + score_tiles * rows * tile) // (32 * warps)
        if regs > _MAX_ACC_REGS:
            return (f"float32 accumulator {rows}x{d} and {score_tiles} score-sized tile(s) {rows}x{tile} need "
                    f"{regs} registers per thread")
        if dtype == "float32" and (2 * rows * d + rows * tile + tile * d) // (32 * warps) > MAX_FP32_REGS:
            return f"float32 dots keep the q {rows}x{d} and k {tile}x{d} tiles in registers too: too many"
        # 4 warps or fewer always pass: the smallest tile, 16x16 at head dim 16, needs 4.
        if warps > 4 and rows * max(tile, d) // (32 * warps) < 4:
            return f"{warps} warps for a {rows}x{tile} tile leave threads idle"
        elt = _elt(dtype)
        smem = rows * d * elt + stages * 2 * tile * d * elt
        limit = device_facts().smem_per_block
        if smem > limit:
            return f"needs {smem} bytes of shared memory, the device has {limit}"
        return None

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """The valid config nearest these leads: all of a KV head's query heads in one program (K and
        V read once), 64 keys per tile (32 for D 256), 4 warps, 3 stages; for decode, context slices
        doubled while the grid covers the SMs less than twice and each slice keeps 2 tiles; for
        longer queries, 64 rows of query tokens x heads."""
        B, lq, lc, hq, hkv, d, _ = _dims(shape)
        group = hq // hkv
        tile = 64 if head_dim_pad(d) <= 128 else 32
        want: Config = {"variant": "general", "HEADS": group, "SPLIT": 1, "TILE": tile, "BLOCK_Q": 1,
                        "num_warps": 4, "num_stages": 3}
        if lq == 1:
            split, programs, target = 1, B * hkv, 2 * device_facts().num_sms
            while programs * split < target and 2 * split <= 64 and lc >= 4 * split * tile:
                split *= 2
            want.update(variant="decode_split" if split > 1 else "decode", SPLIT=split)
        else:
            want["BLOCK_Q"] = max(1, min(next_pow2(lq), 64 // next_pow2(group)))
        return nearest_config(self.configs(shape, dtype), want)

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        _, _, _, hq, hkv, d, bs = _dims(shape)
        return {
            "VARIANT": config["variant"],
            "HEAD_DIM": d,
            "HEAD_DIM_PAD": head_dim_pad(d),
            "GROUP": hq // hkv,
            "HEADS": config["HEADS"],
            "HEADS_PAD": next_pow2(config["HEADS"]),
            "BLOCK_Q": config["BLOCK_Q"],
            "ROWS": _rows(config),
            "BLOCK_SIZE": bs,
            "TILE": config["TILE"],
            "SPLIT": config["SPLIT"],
            "NUM_WARPS": config["num_warps"],
            "NUM_STAGES": config["num_stages"],
            "LAZY_SUM": _lazy_sum(config),
            "FP32": dtype == "float32",
            "ROPE": _rope(shape),
            "PDL": programmatic_launch(),
        }

    # --- running --------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0, *,
                    ragged: bool = False, query_lens: list[int] | None = None,
                    context_lens: list[int] | None = None) -> dict:
        """A paged cache behind a shuffled (non-contiguous) block table, with spare blocks of noise.

        By default every sequence has ``query_len`` new tokens over ``context_len`` cached ones
        (what the cost model counts and SDPA can run; the tiny shapes' contexts end inside a block).
        ``ragged``: the first sequence keeps those lengths, the others draw query lengths in
        1..query_len and context lengths in query_len..context_len, avoiding multiples of the block
        size. ``query_lens`` / ``context_lens``: the ``batch`` lengths to use instead (a query no
        longer than its context, contexts up to context_len). Table entries past a context are -1.

        A ``rope`` shape adds the fused rotation's inputs: q, k_new and v_new as views of one fused
        QKV buffer [T, (Hq + 2 Hkv) D] (unrotated), cos_sin (``rope_cache`` at theta 100, so that
        short contexts rotate every dim a lot) and slot_mapping, each token's newest position's slot
        (which holds noise before the call), the last sequence's -1 (a padding row: nothing stored)
        when there are several.
        """
        B, lq, lc, hq, hkv, d, bs = _dims(shape)
        dt = torch_dtype(dtype)
        rng = torch.Generator().manual_seed(seed)
        ctx, qlen = [lc] * B, [lq] * B
        if ragged:
            for b in range(1, B):
                for _ in range(8):  # redraw a multiple of the block size while others exist
                    ctx[b] = int(torch.randint(lq, lc + 1, (), generator=rng))
                    if ctx[b] % bs or bs == 1:
                        break
                qlen[b] = int(torch.randint(1, min(lq, ctx[b]) + 1, (), generator=rng))
        ctx = ctx if context_lens is None else [int(c) for c in context_lens]
        qlen = qlen if query_lens is None else [int(n) for n in query_lens]
        if len(ctx) != B or len(qlen) != B or not all(0 <= n <= c <= lc for n, c in zip(qlen, ctx)):
            raise ValueError(f"need {B} query lengths <= context lengths <= {lc}, got {qlen} and {ctx}")
        needed = [-(-c // bs) for c in ctx]
        num_blocks = sum(needed) + 3  # spare blocks: noise that a wrong index would read
        perm = torch.randperm(num_blocks, generator=rng)
        table = torch.full((B, -(-lc // bs)), -1, dtype=torch.int32)
        used = 0
        for b, n in enumerate(needed):
            table[b, :n] = perm[used:used + n]
            used += n
        gen = torch.Generator(device=device).manual_seed(seed)
        k_cache, v_cache = (torch.randn(num_blocks, bs, hkv, d, generator=gen, device=device, dtype=dt) for _ in range(2))
        T = sum(qlen)
        cu = torch.tensor([0, *torch.tensor(qlen).cumsum(0).tolist()], dtype=torch.int32)
        inputs = {"k_cache": k_cache, "v_cache": v_cache, "block_tables": table.to(device),
                  "cu_seqlens_q": cu.to(device), "context_lens": torch.tensor(ctx, dtype=torch.int32, device=device),
                  "max_seqlen_q": lq}
        if not _rope(shape):
            inputs["q"] = torch.randn(T, hq, d, generator=gen, device=device, dtype=dt)
        else:
            qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen, device=device, dtype=dt)
            q, k_new, v_new = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
            slots = torch.full((T,), -1, dtype=torch.int64)
            for b in range(B if B == 1 else B - 1):
                if qlen[b]:
                    p = ctx[b] - 1
                    slots[cu[b]] = int(table[b, p // bs]) * bs + p % bs
            inputs.update(q=q.view(T, hq, d), k_new=k_new.view(T, hkv, d), v_new=v_new.view(T, hkv, d),
                          cos_sin=rope_cache(d, lc, 100.0, device=device), slot_mapping=slots.to(device))
        inputs["out"] = torch.empty(T, hq, d, device=device, dtype=dt)
        return inputs

    def _args(self, inputs: dict) -> tuple:
        return tuple(inputs[k] for k in ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "context_lens",
                                         "max_seqlen_q"))

    @staticmethod
    def _new_kv(inputs: dict) -> dict:
        """The fused rotation's arguments of :func:`kernels.attention.paged`, when ``inputs`` has them."""
        return {k: inputs[k] for k in ("k_new", "v_new", "cos_sin", "slot_mapping") if k in inputs}

    def shape_of(self, inputs: dict) -> Shape:
        return self.shape_from_call(*self._args(inputs), **self._new_kv(inputs))

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        return attention.paged(*self._args(inputs), config=config, out=inputs.get("out"), **self._new_kv(inputs))

    def timed_call(self, inputs: dict, config: Config | None) -> Callable[[], Any]:
        """The launch without the host read-back of the metadata (checked by ``run``)."""
        args, new_kv = self._args(inputs), self._new_kv(inputs)
        longest = int(inputs["context_lens"].max())
        return lambda: attention.paged(*args, config=config, out=inputs["out"], max_context_len=longest,
                                       check_values=False, **new_kv)

    def reference(self, inputs: dict) -> torch.Tensor:
        """Per sequence: gather its cache positions through the block table, float64 causal attention.
        With the fused rotation: q and k_new rotated in float64 and rounded to their dtype (as the
        kernel rounds them), the newest position's key and value those of the step, not the cache's."""
        q, k_cache, v_cache = inputs["q"], inputs["k_cache"], inputs["v_cache"]
        bs, hkv, d = k_cache.shape[1:]
        cu = inputs["cu_seqlens_q"].tolist()
        ctx = inputs["context_lens"].tolist()
        table = inputs["block_tables"].long()
        out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
        for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
            blocks = table[b, : -(-ctx[b] // bs)]
            k = k_cache[blocks].reshape(-1, hkv, d)[: ctx[b]]
            v = v_cache[blocks].reshape(-1, hkv, d)[: ctx[b]]
            qb = q[lo:hi]
            if "cos_sin" in inputs and hi > lo:
                angles = inputs["cos_sin"][ctx[b] - 1]
                qb = rotate_reference(qb, angles)
                k, v = k.clone(), v.clone()
                k[-1], v[-1] = rotate_reference(inputs["k_new"][lo], angles), inputs["v_new"][lo]
            pos = ctx[b] - (hi - lo) + torch.arange(hi - lo, device=q.device)
            out[lo:hi] = sdpa_reference(qb, k, v, pos, 1.0 / math.sqrt(d))
        return out

    def cache_reference(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches after a call with the fused rotation and store: the rotated k_new (rounded) and
        v_new at each non-negative slot, every other slot as before."""
        k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
        bs = k_cache.shape[1]
        cu, ctx = inputs["cu_seqlens_q"].tolist(), inputs["context_lens"].tolist()
        for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
            slot = int(inputs["slot_mapping"][lo]) if hi > lo else -1
            if slot >= 0:
                rotated = rotate_reference(inputs["k_new"][lo], inputs["cos_sin"][ctx[b] - 1])
                k_cache[slot // bs, slot % bs] = rotated.to(k_cache.dtype)
                v_cache[slot // bs, slot % bs] = inputs["v_new"][lo]
        return k_cache, v_cache

    def baseline(self, inputs: dict) -> torch.Tensor | None:
        """torch SDPA over a contiguous cache of the same shape, [B, Hkv, context, D] (gathered on the
        first call and kept in ``inputs``), when every sequence has the same query and context
        lengths; None otherwise. Queries are bottom-right aligned: causal when they fill the
        context, an explicit mask when they are a suffix of it, none for decode."""
        if "cos_sin" in inputs:
            return None  # SDPA has no fused rotation; the plain decode shape is its comparison
        if "_sdpa_kv" not in inputs:
            inputs["_sdpa_kv"] = _contiguous_cache(inputs)
        kv = inputs["_sdpa_kv"]
        if kv is None:
            return None
        k, v = kv
        q = inputs["q"]
        B, hkv, lc, d = k.shape
        lq = q.shape[0] // B
        q4 = q.view(B, lq, q.shape[1], d).transpose(1, 2)
        mask = None
        if 1 < lq < lc:
            mask = torch.arange(lc, device=q.device)[None, :] <= torch.arange(lc - lq, lc, device=q.device)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            q4, k, v, attn_mask=mask, is_causal=lq == lc and lq > 1, enable_gqa=q.shape[1] != hkv)
        return out.transpose(1, 2).reshape(q.shape)

    # --- direct calls ---------------------------------------------------------------------------
    def call(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, *,
             config: Config | None = None, **kwargs: Any) -> torch.Tensor:
        return attention.paged(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
                               config=config, **kwargs)

    def shape_from_call(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, *,
                        max_context_len: int | None = None, k_new: torch.Tensor | None = None, **_: Any) -> Shape:
        return attention.paged_shape(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
                                     max_context_len=max_context_len, k_new=k_new)

    def bucket(self, shape: Shape) -> Shape:
        """Batch, query length and context length rounded up to powers of two (decode stays 1), so
        that a context growing by one token per step maps to a few tuned shapes."""
        return {**shape, "batch": next_pow2(shape["batch"]), "query_len": next_pow2(shape["query_len"]),
                "context_len": next_pow2(max(16, shape["context_len"]))}

    # --- cost model -----------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        """4 * D flops per (query head, query, visible key): query i of q_len sees lc - q_len + i + 1 keys."""
        B, lq, lc, hq, _, d, _ = _dims(shape)
        pairs = lq * lc - lq * (lq - 1) / 2
        return 4.0 * B * hq * d * pairs

    def bytes(self, shape: Shape, dtype: str) -> float:
        """K and V of every context read once (decode packs a KV head's query heads in one program),
        q read and out written once, plus the block table entries and the int32 metadata."""
        B, lq, lc, hq, hkv, d, bs = _dims(shape)
        elt = _elt(dtype)
        kv = 2 * B * lc * hkv * d * elt
        qo = 2 * B * lq * hq * d * elt
        meta = 4 * B * (-(-lc // bs) + 2)
        return float(kv + qo + meta)

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"batch": 3, "query_len": 1, "context_len": 45, "heads_q": 4, "heads_kv": 2, "head_dim": 64, "block_size": 16},
            {"batch": 3, "query_len": 7, "context_len": 29, "heads_q": 4, "heads_kv": 1, "head_dim": 32, "block_size": 8},
            {"batch": 2, "query_len": 1, "context_len": 70, "heads_q": 8, "heads_kv": 1, "head_dim": 80, "block_size": 32},
            {"batch": 3, "query_len": 1, "context_len": 77, "heads_q": 8, "heads_kv": 2, "head_dim": 48, "block_size": 8,
             "rope": True},
        ]


def rotate_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated by one position's cos/sin row ``angles`` [D] (``kernels.rope.rotate``) in
    float64, rounded to x's dtype (as the kernel rounds), returned as float64."""
    return rotate(x.double(), angles.double()).to(x.dtype).double()


def _contiguous_cache(inputs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K and V [B, Hkv, context, D] gathered through the block table, or None when the sequences'
    query or context lengths differ (SDPA over a padded cache would need a mask per sequence)."""
    q_lens = (inputs["cu_seqlens_q"][1:] - inputs["cu_seqlens_q"][:-1]).tolist()
    ctx = inputs["context_lens"].tolist()
    if len(set(q_lens)) != 1 or len(set(ctx)) != 1 or q_lens[0] == 0:
        return None
    bs, hkv, d = inputs["k_cache"].shape[1:]
    blocks = inputs["block_tables"][:, : -(-ctx[0] // bs)].long()
    return tuple(
        cache[blocks].reshape(len(ctx), -1, hkv, d)[:, : ctx[0]].transpose(1, 2).contiguous()
        for cache in (inputs["k_cache"], inputs["v_cache"])
    )


FAMILY = PagedFamily()
