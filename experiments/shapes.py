"""Shape sets: which shapes of a kernel family an experiment runs.

A shape set (``conf/shapes/*.yaml``) has a ``source``:
- ``family``: the family's own ``tiny_shapes()`` (CPU-sized, odd sizes included);
- ``model``: every shape the engine runs for a model (``model_shapes``), computed from the model's
  dimensions, batch sizes and lengths rather than typed by hand;
- ``list``: shapes given in the config, per family (``shapes.list.<family>``).
``limit`` keeps the first N shapes.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from kernels.gemm import GEMV_MAX_M

Shape = dict[str, Any]


def _unique(shapes: list[Shape]) -> list[Shape]:
    seen: set[str] = set()
    out = []
    for s in shapes:
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def model_shapes(
    model: dict[str, int],
    decode_batch_sizes: list[int],
    prefill_tokens: list[int],
    prompt_lens: list[int],
    context_lens: list[int],
    block_size: int,
) -> dict[str, list[Shape]]:
    """Every shape the engine launches for ``model`` (Hugging Face config names), per family.

    A decode step of batch b runs b tokens; a prefill step runs ``prefill_tokens`` tokens made of
    ``prefill_tokens // L`` prompts of length L. Per step:
    - GEMMs [M tokens, K in] x [K, N out] with B a weight view: fused QKV (N = (Hq + 2 Hkv) D,
      K = hidden), output (N = hidden, K = Hq D), fused gate/up (N = 2 I, K = hidden), down
      (N = hidden, K = I), each at M = tokens of the step; the LM head (N = vocab, K = hidden) at
      M = sequences of the step (only each sequence's last token is sampled);
    - attention_prefill: causal varlen attention of the step's prompts;
    - attention_paged: decode (query_len 1) over each context length, with rope and the KV store
      fused in (``"rope": True``, the Triton backend's ``rope_attention``), and the prompts of a
      prefill step through the same paged path (query_len = context_len = L);
    - rmsnorm over hidden and silu_mul over the intermediate size at M = tokens of the step; rope on
      q and k with the KV store fused in (the Triton backend's ``rope_store``) at M = tokens of a
      prefill step (a decode step's is inside its attention); kv_store
      alone, as the unfused path would write K and V into one layer's cache (the largest decode
      batch at the longest context).
    Steps of at most GEMV_MAX_M tokens run as the engine's Triton backend runs them: the norms
    inside the QKV and gate/up GEMVs (norm_gemv; the first layer's QKV without a residual, the
    embedding lookup inside: its gather shape) and the
    activation inside the down projection's (silu_gemv), so those GEMMs and silu_mul are not
    launched there, and rmsnorm only as the final norm.
    """
    H, I, V = model["hidden_size"], model["intermediate_size"], model["vocab_size"]
    Hq, Hkv = model["num_attention_heads"], model["num_key_value_heads"]
    D = model.get("head_dim") or H // Hq
    heads = {"heads_q": Hq, "heads_kv": Hkv, "head_dim": D}
    prompts = [(max(1, t // L), L) for t in prefill_tokens for L in prompt_lens]
    tokens = sorted(set(decode_batch_sizes) | set(prefill_tokens))
    fused = [t for t in tokens if t <= GEMV_MAX_M]
    unfused = [t for t in tokens if t > GEMV_MAX_M]
    seqs = sorted(set(decode_batch_sizes) | {b for b, _ in prompts})
    proj = [((Hq + 2 * Hkv) * D, H), (H, Hq * D), (2 * I, H), (H, I)]
    # One layer's paged cache: the largest decode batch at the longest context (one block more each).
    cache_blocks = max(decode_batch_sizes) * (max(context_lens) // block_size + 1)
    return {
        "gemm": _unique(
            [{"M": m, "N": n, "K": k, "b_transposed": True} for m in tokens for n, k in proj
             if m > GEMV_MAX_M or (n, k) == (H, Hq * D)]  # the output projection has no prologue
            + [{"M": m, "N": V, "K": H, "b_transposed": True} for m in seqs]
        ),
        "norm_gemv": _unique(
            [{"M": m, "N": (Hq + 2 * Hkv) * D, "K": H, "residual": True} for m in fused]
            + [{"M": m, "N": (Hq + 2 * Hkv) * D, "K": H, "residual": False, "gather": True} for m in fused]
            + [{"M": m, "N": 2 * I, "K": H, "residual": True} for m in fused]
        ),
        "silu_gemv": [{"M": m, "N": H, "K": I} for m in fused],
        "attention_prefill": _unique([{"batch": b, "seqlen": L, **heads, "causal": True} for b, L in prompts]),
        "attention_paged": _unique(
            [
                {"batch": b, "query_len": 1, "context_len": c, **heads, "block_size": block_size, "rope": True}
                for b in decode_batch_sizes
                for c in context_lens
            ]
            + [{"batch": b, "query_len": L, "context_len": L, **heads, "block_size": block_size} for b, L in prompts]
        ),
        "rmsnorm": _unique([{"tokens": t, "hidden": H, "residual": True} for t in tokens]),
        "silu_mul": _unique([{"tokens": t, "intermediate": I} for t in unfused]),
        "rope": _unique([{"tokens": t, **heads, "block_size": block_size} for t in sorted(set(prefill_tokens))]),
        "kv_store": _unique(
            [
                {"tokens": t, "heads_kv": Hkv, "head_dim": D, "block_size": block_size, "num_blocks": cache_blocks}
                for t in tokens
            ]
        ),
    }


def _from_model(node: DictConfig, family: str) -> list[Shape]:
    by_family = model_shapes(
        OmegaConf.to_container(node.model, resolve=True),
        list(node.decode_batch_sizes),
        list(node.prefill_tokens),
        list(node.prompt_lens),
        list(node.context_lens),
        int(node.block_size),
    )
    if family not in by_family:
        raise ValueError(f"shape set {node.name!r} derives no shapes for family {family!r}; it covers {sorted(by_family)}")
    return by_family[family]


def _from_list(node: DictConfig, family: str) -> list[Shape]:
    shapes = OmegaConf.to_container(node.list, resolve=True).get(family)
    if not shapes:
        raise ValueError(f"shape set {node.name!r} lists no shapes for family {family!r}; add shapes.list.{family}=[{{...}}]")
    if not all(isinstance(s, dict) for s in shapes):
        raise ValueError(f"shapes.list.{family} must be a list of dicts of ints, got {shapes}")
    return shapes


def shape_set(node: DictConfig, family: Any) -> list[Shape]:
    """The shapes of ``family`` (a kernels Family) that shape set ``node`` selects.

    ``ValueError`` naming the set when it has no shapes for the family or an unknown source.
    """
    sources: dict[str, Callable[[], list[Shape]]] = {
        "family": family.tiny_shapes,
        "model": lambda: _from_model(node, family.name),
        "list": lambda: _from_list(node, family.name),
    }
    if node.source not in sources:
        raise ValueError(f"shape set {node.name!r} has source {node.source!r}; expected one of {sorted(sources)}")
    shapes = sources[node.source]()
    limit = node.get("limit")
    return shapes[: int(limit)] if limit is not None else shapes


def shape_label(shape: Shape) -> str:
    """A short label for plots: 'M=37 N=29 K=45', booleans shown by name when true."""
    parts = []
    for k, v in shape.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)
