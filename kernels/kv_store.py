"""The KV-store family: write a step's new keys and values into the paged KV cache.

    k_cache[s // block_size, s % block_size] = k[t],  v_cache[...] = v[t]   for s = slot_mapping[t] >= 0

A negative slot skips its token (the padding of a batch run at a fixed, CUDA-graph-captured
size). A pure copy: the output must equal the reference exactly.

Shape dicts are ``{"tokens", "heads_kv", "head_dim", "block_size", "num_blocks"}`` with an
optional ``"padded"`` (default 0): how many of the tokens, at the end, make_inputs marks as
padding. The template is ``kernels/templates/kv_store.py.j2``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kernels import checks
from kernels.family import Config, Family, Shape, dtype_name, next_pow2, occupancy_reject, positive_dims, torch_dtype

MAX_ELEMENTS_PER_THREAD = 32  # values of one token's k tile (and as many of v) per thread


def _dims(shape: Shape) -> tuple[int, int, int, int, int, int]:
    T, H, D, B, N = positive_dims("kv_store", shape, ("tokens", "heads_kv", "head_dim", "block_size", "num_blocks"))
    padded = int(shape.get("padded", 0))
    if not 0 <= padded <= T:
        raise ValueError(f"kv_store shape's padded must be in [0, tokens], got {shape}")
    if T - padded > N * B:
        raise ValueError(f"kv_store: {T - padded} tokens do not fit {N} blocks of {B} slots")
    return T, H, D, B, N, padded


class KVStoreFamily(Family):
    name = "kv_store"
    template_file = "kv_store.py.j2"
    template_version = 1

    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        # Nothing here depends on `tokens`: a config tuned for one token count is valid for all.
        _dims(shape)
        torch_dtype(dtype)
        return {"BLOCK_T": [1, 2, 4, 8, 16], "num_warps": [1, 2, 4, 8]}

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        _, H, D, _, _, _ = _dims(shape)
        tile = next_pow2(H) * next_pow2(D)
        return occupancy_reject(tile, config["num_warps"], MAX_ELEMENTS_PER_THREAD, f"a {H}x{D} tile")

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """One token per program, 8 values of k and 8 of v per thread."""
        _, H, D, _, _, _ = _dims(shape)
        tile = next_pow2(H) * next_pow2(D)
        return {"BLOCK_T": 1, "num_warps": min(8, max(1, tile // 256))}

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        _, H, D, B, _, _ = _dims(shape)
        return {
            "HEADS_KV": H,
            "HEAD_DIM": D,
            "HEADS_PAD": next_pow2(H),
            "DIM_PAD": next_pow2(D),
            "BLOCK_SIZE": B,
            "BLOCK_T": config["BLOCK_T"],
            "EVEN": H == next_pow2(H) and D == next_pow2(D),
            "NUM_WARPS": config["num_warps"],
        }

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        """k, v and the caches' old contents random; distinct random slots, the last ``padded`` -1.

        ``out`` [2, num_blocks, block_size, H, D] receives (k_cache, v_cache): ``run`` copies the old
        contents in and stores into it, so a missed store leaves an old value that fails the check.
        """
        T, H, D, B, N, padded = _dims(shape)
        dt = torch_dtype(dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        slots = torch.randperm(N * B, generator=gen)[:T]
        if padded:
            slots[T - padded:] = -1
        return {
            "k": torch.randn(T, H, D, generator=gen).to(device=device, dtype=dt),
            "v": torch.randn(T, H, D, generator=gen).to(device=device, dtype=dt),
            "k_cache": torch.randn(N, B, H, D, generator=gen).to(device=device, dtype=dt),
            "v_cache": torch.randn(N, B, H, D, generator=gen).to(device=device, dtype=dt),
            "slot_mapping": slots.to(device),
            "out": torch.empty(2, N, B, H, D, device=device, dtype=dt),
        }

    def shape_of(self, inputs: dict) -> Shape:
        T, H, D = inputs["k"].shape
        N, B = inputs["k_cache"].shape[:2]
        padded = int((inputs["slot_mapping"] < 0).sum())
        return {"tokens": T, "heads_kv": H, "head_dim": D, "block_size": B, "num_blocks": N, "padded": padded}

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        out = inputs["out"]
        out[0].copy_(inputs["k_cache"])
        out[1].copy_(inputs["v_cache"])
        kv_store(inputs["k"], inputs["v"], out[0], out[1], inputs["slot_mapping"], config=config)
        return out

    def timed_call(self, inputs: dict, config: Config | None) -> Callable[[], Any]:
        """Store into the caches in ``out``, over and over, without run()'s copy of the old contents."""
        out = inputs["out"]
        return lambda: kv_store(inputs["k"], inputs["v"], out[0], out[1], inputs["slot_mapping"], config=config)

    def reference(self, inputs: dict) -> torch.Tensor:
        caches = torch.stack([inputs["k_cache"], inputs["v_cache"]]).double()
        kv_store_torch_padded(inputs["k"].double(), inputs["v"].double(), caches[0], caches[1], inputs["slot_mapping"])
        return caches

    def baseline(self, inputs: dict) -> torch.Tensor:
        caches = torch.stack([inputs["k_cache"], inputs["v_cache"]])
        kv_store_torch_padded(inputs["k"], inputs["v"], caches[0], caches[1], inputs["slot_mapping"])
        return caches

    def tolerance(self, dtype: str, device: torch.device | str) -> float:
        return 0.0  # a copy: exact

    def call(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, config: Config | None = None) -> None:
        kv_store(k, v, k_cache, v_cache, slot_mapping, config=config)

    def shape_from_call(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, *_: Any, **__: Any) -> Shape:
        T, H, D = k.shape
        N, B = k_cache.shape[:2]
        return {"tokens": T, "heads_kv": H, "head_dim": D, "block_size": B, "num_blocks": N}

    # --- cost model ---------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        return 0.0  # a copy

    def bytes(self, shape: Shape, dtype: str) -> float:
        T, H, D, _, _, padded = _dims(shape)
        elt = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        # k and v of each stored token read once and written once, plus an int64 slot per token.
        return float(4 * (T - padded) * H * D * elt + 8 * T)

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"tokens": 5, "heads_kv": 2, "head_dim": 16, "block_size": 4, "num_blocks": 3},  # powers of two
            {"tokens": 7, "heads_kv": 3, "head_dim": 24, "block_size": 16, "num_blocks": 2, "padded": 2},  # odd, padding
            {"tokens": 1, "heads_kv": 1, "head_dim": 64, "block_size": 8, "num_blocks": 4},  # decode: one token
        ]


FAMILY = KVStoreFamily()


def kv_store_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """The plain PyTorch equivalent: index_copy_ into the caches viewed as [slots, H, D].

    Every slot must be valid (dropping negative ones would need a host sync on a GPU).
    """
    N, B, H, D = k_cache.shape
    k_cache.view(N * B, H, D).index_copy_(0, slot_mapping.long(), k)
    v_cache.view(N * B, H, D).index_copy_(0, slot_mapping.long(), v)


def kv_store_torch_padded(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """:func:`kv_store_torch` of the tokens whose slot is not negative, as the kernel skips padding
    (selecting them syncs with a GPU)."""
    keep = slot_mapping >= 0
    kv_store_torch(k[keep], v[keep], k_cache, v_cache, slot_mapping[keep])


def check_store(fn: str, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """``ValueError``/``TypeError`` naming ``fn`` unless k, v [T, Hkv, D] go into k_cache, v_cache
    [num_blocks, block_size, Hkv, D] by slot_mapping [T] (int32 or int64): one float dtype, one
    device, contiguous last dims. The rope family's fused store checks the same."""
    for name, t, dims in (("k", k, 3), ("v", v, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                          ("slot_mapping", slot_mapping, 1)):
        checks.tensor(fn, name, t, dims)
    checks.float_dtype(fn, "k", k)
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        checks.float_dtype(fn, name, t, like=k)
    checks.index_dtype(fn, "slot_mapping", slot_mapping)
    T, H, D = k.shape
    N, B = k_cache.shape[:2]
    checks.shape(fn, "v", v, (T, H, D), "[T, Hkv, D] like k")
    checks.shape(fn, "k_cache", k_cache, (N, B, H, D), "[num_blocks, block_size, Hkv, D]")
    checks.shape(fn, "v_cache", v_cache, (N, B, H, D), "[num_blocks, block_size, Hkv, D] like k_cache")
    checks.shape(fn, "slot_mapping", slot_mapping, (T,), "[T]")
    checks.same_device(fn, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        checks.unit_last_stride(fn, name, t)


def check_slots(fn: str, slot_mapping: torch.Tensor, num_slots: int) -> None:
    """``ValueError`` for a slot past the cache, when slot_mapping is on the CPU. On a GPU the check
    would cost a sync, so there the kernels' device_assert guards (active under TRITON_DEBUG=1)."""
    if slot_mapping.device.type == "cpu" and slot_mapping.numel() and int(slot_mapping.max()) >= num_slots:
        raise ValueError(f"{fn}: slot {int(slot_mapping.max())} is past the cache's {num_slots} slots")


def kv_store(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    config: Config | None = None,
) -> None:
    """Write k, v [T, Hkv, D] into k_cache, v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T].

    slot_mapping (int32 or int64) holds flat slots block * block_size + offset; a negative slot skips
    its token. Every tensor needs a contiguous last dim; other strides may be anything (k and v may
    be views of a fused QKV output, the caches one layer's view of a larger cache). Slots past the
    cache raise ValueError when slot_mapping is on the CPU; on a GPU the check would cost a sync, so
    there the kernel's device_assert guards instead (active under TRITON_DEBUG=1).
    ``config`` None uses the family's default config.
    """
    fn = "kv_store"
    check_store(fn, k, v, k_cache, v_cache, slot_mapping)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"{fn}: config must be a dict or None, got {type(config).__name__}")
    T, H, D = k.shape
    N, B = k_cache.shape[:2]
    if T == 0:
        return
    check_slots(fn, slot_mapping, N * B)
    # Token and block counts are no shape facts of the variant: one memo entry serves them all.
    shape = {"tokens": 1, "heads_kv": H, "head_dim": D, "block_size": B, "num_blocks": 1}
    FAMILY.resolve(shape, dtype_name(k.dtype), config)[1].launch(k, v, k_cache, v_cache, slot_mapping.contiguous())
