"""The rotary-embedding family: q and k rotated in place from a precomputed cos/sin cache.

The Llama / Hugging Face convention ("rotate_half"): dimension i of a head pairs with i + D/2, and
both use the angle position * inv_freq[i]. The cache row of a position holds cos of the D/2
angles then their sin ([max_pos, D], vLLM's layout), built once by :func:`rope_cache`, which
computes inv_freq exactly as transformers does for the default, ``linear`` and ``llama3`` rope
types. Scaling lives entirely in the cache, so it changes no kernel text.

With ``v``, the caches and a slot mapping, the kernel also does the kv_store family's write: the
rotated k and v go into the paged KV cache (a decode step's rope and KV store as one launch). Shape
dicts are ``{"tokens", "heads_q", "heads_kv", "head_dim"}``, plus ``"block_size"`` (the cache's
tokens per block) for the fused store; the template is ``kernels/templates/rope.py.j2``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from kernels import checks
from kernels.device import programmatic_launch
from kernels.kv_store import check_slots, check_store, kv_store_torch_padded
from kernels.family import (
    Config, DTYPES, Family, Shape, dtype_name, next_pow2, occupancy_reject, positive_dims, tolerance, torch_dtype,
)

MAX_ELEMENTS_PER_THREAD = 32  # float32 values of one head group's two halves per thread
CACHE_POSITIONS = 4096  # make_inputs: rows of the cos/sin cache
THETA = 500000.0  # make_inputs: Llama 3's base
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}  # Llama 3.2's rope_scaling


def _dims(shape: Shape) -> tuple[int, int, int, int]:
    T, Hq, Hkv, D = positive_dims("rope", shape, ("tokens", "heads_q", "heads_kv", "head_dim"))
    if D % 2:
        raise ValueError(f"rope: head_dim must be even (the two halves are rotated together), got {D}")
    return T, Hq, Hkv, D


def _store_block(shape: Shape) -> int | None:
    """The cache's block size when the shape has the fused KV store, else None."""
    if shape.get("block_size") is None:
        return None
    return positive_dims("rope", shape, ("block_size",))[0]


# --- the cos/sin cache ----------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """inverse frequencies [head_dim // 2] in float32, as transformers' rope init functions compute them.

    ``scaling`` is a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict, or None for plain RoPE:
    ``{"rope_type": "linear", "factor": f}`` divides every frequency by f;
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` divides long wavelengths by ``factor``, keeps short ones
    and interpolates smoothly between (Llama 3.1's scheme). ``"type"`` is accepted for ``"rope_type"``.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope_cache: head_dim must be a positive even int, got {head_dim!r}")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"rope_cache: theta must be a positive number, got {theta!r}")
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if scaling is not None and float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("rope_cache: partial_rotary_factor != 1 is not supported")
    # The same float32 operations in the same order as transformers, so the frequencies match bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    if kind == "default":
        return inv_freq
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    if kind not in need:
        raise ValueError(f"rope_cache: unsupported rope_type {kind!r}; supported are 'default', 'linear' and 'llama3'")
    missing = [k for k in need[kind] if k not in scaling]
    if missing:
        raise ValueError(f"rope_cache: {kind} scaling needs key(s) {missing}")
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    if not high > low:
        raise ValueError(f"rope_cache: llama3 scaling needs high_freq_factor > low_freq_factor, got {high} and {low}")
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than the pre-training context are stretched by `factor`, shorter than
    # a quarter of it (high_freq_factor 4) kept, and those between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cache(
    head_dim: int,
    max_positions: int,
    theta: float,
    scaling: dict | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """cos/sin cache [max_positions, head_dim]: row p is cos(p * inv_freq) then sin(p * inv_freq).

    Angles are position * inv_freq in float32 (as transformers' LlamaRotaryEmbedding forms them), so
    the cache equals its cos and sin; see :func:`rope_inv_freq` for ``theta`` and ``scaling``.
    """
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"rope_cache: max_positions must be a positive int, got {max_positions!r}")
    if dtype not in DTYPES.values():
        raise TypeError(f"rope_cache: dtype {dtype} is not one of {sorted(DTYPES)}")
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device=device, dtype=dtype)


# --- the family -----------------------------------------------------------------------------------
class RopeFamily(Family):
    name = "rope"
    template_file = "rope.py.j2"
    template_version = 1

    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        # Nothing here depends on `tokens`: a config tuned for one token count is valid for all.
        _, Hq, Hkv, _ = _dims(shape)
        torch_dtype(dtype)
        return {
            "HEAD_BLOCK": [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= next_pow2(max(Hq, Hkv))],
            "BLOCK_T": [1, 2, 4, 8],
            "num_warps": [1, 2, 4, 8],
        }

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        _, _, _, D = _dims(shape)
        # Both halves of HEAD_BLOCK heads; with the store, v's heads are held too.
        tile = config["HEAD_BLOCK"] * next_pow2(D // 2) * (2 if _store_block(shape) is None else 4)
        return occupancy_reject(tile, config["num_warps"], MAX_ELEMENTS_PER_THREAD,
                                f"{config['HEAD_BLOCK']} heads of {D}")

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """All heads of a kind in one program (cos and sin loaded once), 16 values per thread."""
        _, Hq, Hkv, D = _dims(shape)
        half_pad = next_pow2(D // 2)
        heads = min(next_pow2(max(Hq, Hkv)), max(1, 1024 // half_pad))
        warps = min(8, max(1, heads * half_pad * 2 // 512))
        return {"HEAD_BLOCK": heads, "BLOCK_T": 1, "num_warps": warps}

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        _, Hq, Hkv, D = _dims(shape)
        hb = config["HEAD_BLOCK"]
        return {
            "HEADS_Q": Hq,
            "HEADS_KV": Hkv,
            "HEAD_DIM": D,
            "HALF": D // 2,
            "HALF_PAD": next_pow2(D // 2),
            "HEAD_BLOCK": hb,
            "BLOCK_T": config["BLOCK_T"],
            "EVEN_HALF": D // 2 == next_pow2(D // 2),
            "EVEN_HEADS": Hq % hb == 0 and Hkv % hb == 0,
            "STORE": _store_block(shape) is not None,
            "BLOCK_SIZE": _store_block(shape),
            "NUM_WARPS": config["num_warps"],
            "PDL": programmatic_launch(),
        }

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        """q, k random; positions random in the cache; ``out`` [T, Hq + Hkv, D] receives q then k.

        ``run`` copies q and k into their views of ``out`` and rotates those in place, so the
        views have the strides of a fused QKV projection's output. With the fused store: v and the
        caches' old contents random, distinct random slots with the last token's -1 (padding), and
        ``caches_out`` [2, num_blocks, block_size, Hkv, D] receiving the caches, so a missed store
        leaves an old value that fails the check.
        """
        T, Hq, Hkv, D = _dims(shape)
        dt = torch_dtype(dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        inputs = {
            "q": torch.randn(T, Hq, D, generator=gen).to(device=device, dtype=dt),
            "k": torch.randn(T, Hkv, D, generator=gen).to(device=device, dtype=dt),
            "positions": torch.randint(0, CACHE_POSITIONS, (T,), generator=gen).to(device),
            "cos_sin_cache": _cached_rope_cache(D, str(torch.device(device))),
            "out": torch.empty(T, Hq + Hkv, D, device=device, dtype=dt),
        }
        B = _store_block(shape)
        if B is not None:
            N = T // B + 2
            slots = torch.randperm(N * B, generator=gen)[:T]
            if T > 1:
                slots[-1] = -1
            inputs.update(
                v=torch.randn(T, Hkv, D, generator=gen).to(device=device, dtype=dt),
                caches=torch.randn(2, N, B, Hkv, D, generator=gen).to(device=device, dtype=dt),
                slot_mapping=slots.to(device),
                caches_out=torch.empty(2, N, B, Hkv, D, device=device, dtype=dt),
            )
        return inputs

    def shape_of(self, inputs: dict) -> Shape:
        T, Hq, D = inputs["q"].shape
        shape = {"tokens": T, "heads_q": Hq, "heads_kv": inputs["k"].shape[1], "head_dim": D}
        if "caches" in inputs:
            shape["block_size"] = inputs["caches"].shape[2]
        return shape

    def _store_args(self, inputs: dict) -> dict:
        if "caches" not in inputs:
            return {}
        caches = inputs["caches_out"]
        return {"v": inputs["v"], "k_cache": caches[0], "v_cache": caches[1], "slot_mapping": inputs["slot_mapping"]}

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        """q then k rotated, [T, Hq + Hkv, D]; with the store, flattened and followed by the caches."""
        out, Hq = inputs["out"], inputs["q"].shape[1]
        q, k = out[:, :Hq], out[:, Hq:]
        q.copy_(inputs["q"])
        k.copy_(inputs["k"])
        if "caches" in inputs:
            inputs["caches_out"].copy_(inputs["caches"])
        rope(q, k, inputs["positions"], inputs["cos_sin_cache"], config=config, **self._store_args(inputs))
        return out if "caches" not in inputs else torch.cat([out.flatten(), inputs["caches_out"].flatten()])

    def timed_call(self, inputs: dict, config: Config | None) -> Callable[[], Any]:
        """Rotate q's and k's views of ``out`` in place (and store), over and over, without run()'s copy-in."""
        out, Hq = inputs["out"], inputs["q"].shape[1]
        q, k = out[:, :Hq], out[:, Hq:]
        store = self._store_args(inputs)
        return lambda: rope(q, k, inputs["positions"], inputs["cos_sin_cache"], config=config, **store)

    def _stored(self, inputs: dict, qk: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``qk`` alone, or flattened and followed by the caches with the rotated ``k`` and v stored."""
        if "caches" not in inputs:
            return qk
        caches = inputs["caches"].to(k.dtype)
        kv_store_torch_padded(k, inputs["v"].to(k.dtype), caches[0], caches[1], inputs["slot_mapping"])
        return torch.cat([qk.flatten(), caches.flatten()])

    def reference(self, inputs: dict) -> torch.Tensor:
        cache = inputs["cos_sin_cache"][inputs["positions"]].double()
        q, k = rope_torch(inputs["q"].double(), inputs["k"].double(), cache)
        return self._stored(inputs, torch.cat([q, k], dim=1), k)

    def baseline(self, inputs: dict) -> torch.Tensor:
        cache = inputs["cos_sin_cache"][inputs["positions"]]
        q, k = rope_torch(inputs["q"], inputs["k"], cache)
        return self._stored(inputs, torch.cat([q, k], dim=1), k)

    def call(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, *,
             config: Config | None = None, **store: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(q, k, positions, cos_sin_cache, config=config, **store)

    def shape_from_call(self, q: torch.Tensor, k: torch.Tensor, *_: Any, k_cache: torch.Tensor | None = None,
                        **__: Any) -> Shape:
        shape = self.shape_of({"q": q, "k": k})
        if k_cache is not None:
            shape["block_size"] = k_cache.shape[1]
        return shape

    def tolerance(self, dtype: str, device: torch.device | str) -> float:
        # No matrix units here: float32 stays float32 on a GPU too (no TF32 allowance).
        return 1e-5 if dtype == "float32" else tolerance(dtype, device)

    # --- cost model ---------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        T, Hq, Hkv, D = _dims(shape)
        return float(T * (Hq + Hkv) * D * 3)  # per pair: 4 multiplies, 2 adds

    def bytes(self, shape: Shape, dtype: str) -> float:
        T, Hq, Hkv, D = _dims(shape)
        elt = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        # q and k read and written, a float32 cache row and an int64 position per token; with the
        # store, k written again, v read and written and an int64 slot per token.
        store = 0 if _store_block(shape) is None else T * (3 * Hkv * D * elt + 8)
        return float(2 * T * (Hq + Hkv) * D * elt + T * (D * 4 + 8) + store)

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"tokens": 5, "heads_q": 4, "heads_kv": 2, "head_dim": 16},  # GQA, powers of two
            {"tokens": 3, "heads_q": 6, "heads_kv": 3, "head_dim": 24},  # odd heads, half dim 12
            {"tokens": 1, "heads_q": 2, "heads_kv": 2, "head_dim": 64},  # decode, multi-head
            {"tokens": 6, "heads_q": 6, "heads_kv": 3, "head_dim": 24, "block_size": 4},  # store, odd, padding
            {"tokens": 1, "heads_q": 8, "heads_kv": 2, "head_dim": 32, "block_size": 16},  # store, decode
        ]


FAMILY = RopeFamily()


@functools.lru_cache(maxsize=16)
def _cached_rope_cache(head_dim: int, device: str) -> torch.Tensor:
    """make_inputs' cache (Llama 3.2's scaling), built once per head dim and device."""
    return rope_cache(head_dim, CACHE_POSITIONS, THETA, LLAMA3_SCALING, device=device)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated (out of place, in x's dtype) by cos_sin [..., D] (cos of the D/2 angles, then
    sin; broadcast against x): x * cos + rotate_half(x) * sin, Hugging Face's pairing of dim i with
    i + D/2."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[..., :half].to(x.dtype), cos_sin[..., half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_torch(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch rotate_half RoPE (out of place) of q [T, Hq, D] and k [T, Hkv, D] from the
    gathered cache rows cos_sin [T, D]."""
    return rotate(q, cos_sin[:, None, :]), rotate(k, cos_sin[:, None, :])


def check_cos_sin(fn: str, name: str, cos_sin: torch.Tensor, q: torch.Tensor) -> None:
    """The checks of a cos/sin cache [max_pos, D] (:func:`rope_cache`) rotating q [..., D]: 2-D,
    float32 or q's dtype, D even and equal to q's head dim, on q's device."""
    checks.tensor(fn, name, cos_sin, 2)
    if cos_sin.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"{fn}: {name} has dtype {cos_sin.dtype}; expected torch.float32 or q's {q.dtype}")
    d = q.shape[-1]
    if d % 2:
        raise ValueError(f"{fn}: rope needs an even head dim (the two halves are rotated together), got {d}")
    if cos_sin.shape[1] != d or cos_sin.device != q.device:
        raise ValueError(f"{fn}: {name} must be [max_pos, D={d}] on {q.device}, got {list(cos_sin.shape)} on "
                         f"{cos_sin.device}")


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    config: Config | None = None,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the angles of their tokens' positions.

    positions [T] int32 or int64 index rows of cos_sin_cache [max_pos, D] (from :func:`rope_cache`;
    float32 or q's dtype). q and k need a contiguous last dim; their token and head strides may be
    anything (views into a fused QKV output). D must be even. Returns (q, k), rotated.
    ``config`` None uses the family's default config.

    With v [T, Hkv, D], k_cache and v_cache [num_blocks, block_size, Hkv, D] (the same strides) and
    slot_mapping [T] (all four or none), the same launch also does :func:`kernels.kv_store.kv_store`
    with the rotated k: k and v go into the caches at the flat slots, a negative slot skipped.
    """
    fn = "rope"
    checks.tensor(fn, "q", q, 3)
    checks.tensor(fn, "k", k, 3)
    checks.tensor(fn, "positions", positions, 1)
    checks.float_dtype(fn, "q", q)
    checks.float_dtype(fn, "k", k, like=q)
    checks.index_dtype(fn, "positions", positions)
    check_cos_sin(fn, "cos_sin_cache", cos_sin_cache, q)
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"rope: k must be [T, Hkv, D] = [{T}, Hkv, {D}] like q, got {list(k.shape)}")
    checks.shape(fn, "positions", positions, (T,), "[T]")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"rope: config must be a dict or None, got {type(config).__name__}")
    checks.same_device(fn, q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    store = {"v": v, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping}
    given = [name for name, t in store.items() if t is not None]
    if given and len(given) != len(store):
        raise ValueError(f"rope: the fused KV store needs v, k_cache, v_cache and slot_mapping; got only {given}")
    if given:
        check_store(fn, k, v, k_cache, v_cache, slot_mapping)  # k shares q's device, checked above
        if k_cache.stride() != v_cache.stride():
            raise ValueError(f"rope: k_cache and v_cache must have the same strides, got {k_cache.stride()} "
                             f"and {v_cache.stride()}")
        check_slots(fn, slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    positions = positions.contiguous()  # the kernel reads position t at offset t
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        checks.unit_last_stride(fn, name, t)
    if positions.device.type == "cpu" and T > 0:
        # Cheap on the host; on a GPU it would cost a sync, so there the kernel's device_assert guards
        # (active under TRITON_DEBUG=1).
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            raise ValueError(f"rope: positions span [{lo}, {hi}] but the cache has {cos_sin_cache.shape[0]} rows")
    if T > 0:
        shape = {"tokens": 1, "heads_q": Hq, "heads_kv": k.shape[1], "head_dim": D}  # any T: one entry
        if given:
            shape["block_size"] = k_cache.shape[1]
            extra = (v, k_cache, v_cache, slot_mapping.contiguous())
        else:
            extra = ()
        FAMILY.resolve(shape, dtype_name(q.dtype), config)[1].launch(q, k, positions, cos_sin_cache, *extra)
    return q, k
