"""The attention_prefill family: FlashAttention-2 forward over packed variable-length sequences.

Shape dicts are ``{"batch", "seqlen", "heads_q", "heads_kv", "head_dim", "causal"}``: ``seqlen`` is
the longest sequence (``max_seqlen``). Structural variants (the categorical parameter ``variant``):
- ``ptr``: K and V tiles loaded through pointers (any head dim up to 256, padded to a power of two);
- ``tma`` (Hopper, and the interpreter): Q, K and V tiles through tensor descriptors (head dims
  that are powers of two); Q stays in shared memory, not in registers.
- ``ws``, ``ws_pp``, ``wsp`` and ``wsp_pp`` (Hopper GPUs, head dims 64 and 128, float16 and
  bfloat16): a Gluon kernel with warp specialisation, FlashAttention-3's forward: a loader warp
  and two consumer warp groups of 64 query rows, each overlapping one key block's softmax with
  the products of the next. ``wsp*``: persistent programs, one per SM; ``*_pp``: the consumers
  take turns at the tensor cores (ping-pong). Template
  ``kernels/templates/attention_prefill_ws.py.j2``; BLOCK_M 128 and 4 warps (one consumer warp
  group) fixed, registers split by the template, not by ``maxnreg``.
Tunables: BLOCK_M (queries per program), BLOCK_N (keys per step), num_warps, num_stages, and
``maxnreg`` (registers per thread, 0 for the compiler's choice: a cap lets two programs share an SM
so that one's softmax overlaps the other's matrix products; Triton's launch option of that name).
The generator specialises on the head dim, causal or not, and the GQA group size.

The templates are ``kernels/templates/attention_prefill.py.j2`` and, for the ws variants,
``attention_prefill_ws.py.j2``; the direct call is
:func:`kernels.attention.prefill`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from kernels import attention, generator
from kernels.device import device_facts, interpreting
from kernels.family import Config, Family, Shape, config_steps, next_pow2, positive_dims, torch_dtype

_KEYS = ("batch", "seqlen", "heads_q", "heads_kv", "head_dim", "causal")
# A thread holds the float32 accumulator [BLOCK_M, D] and score tile [BLOCK_M, BLOCK_N]; beyond
# this many of their registers per thread the kernel spills.
_MAX_ACC_REGS = 192
# Variants of the warp-specialised Gluon template.
WS_VARIANTS = ("ws", "ws_pp", "wsp", "wsp_pp")
# float32 operands (exact products) go through FMA units whose operand tiles live in registers too:
# beyond this many registers per thread for accumulator, scores, q and k, ptxas spills heavily.
MAX_FP32_REGS = 96


def _elt(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def _dims(shape: Shape) -> tuple[int, int, int, int, int, bool]:
    """(batch, seqlen, Hq, Hkv, D, causal) of a shape dict, checked."""
    if "causal" not in shape:
        raise ValueError(f"attention_prefill shape needs keys {list(_KEYS)}; 'causal' is missing from {shape}")
    B, L, hq, hkv, d = positive_dims("attention_prefill", shape, _KEYS[:5])
    if hq % hkv:
        raise ValueError(f"attention_prefill: heads_q={hq} is not a multiple of heads_kv={hkv}")
    if d > attention.MAX_HEAD_DIM:
        raise ValueError(f"attention_prefill: head_dim {d} exceeds {attention.MAX_HEAD_DIM}")
    return B, L, hq, hkv, d, bool(shape["causal"])


def head_dim_pad(d: int) -> int:
    """Lanes of the head dim in registers: the next power of two, at least tl.dot's 16."""
    return max(16, next_pow2(d))


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None,
                   scale: float, max_scores: int = 1 << 26) -> torch.Tensor:
    """softmax(q k^T * scale) v in float64 for one sequence, query rows in chunks to bound memory.

    q [Lq, Hq, D], k and v [Lk, Hkv, D] (KV head h // (Hq / Hkv) serves query head h); q_pos [Lq]
    (int64) the position of each query among the keys, which sees keys 0..q_pos (None: all keys).
    Returns [Lq, Hq, D] float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = torch.empty_like(q)
    chunk = max(1, max_scores // max(1, q.shape[1] * k.shape[0]))
    keys = torch.arange(k.shape[0], device=q.device)
    for lo in range(0, q.shape[0], chunk):
        hi = min(lo + chunk, q.shape[0])
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi], k) * scale
        if q_pos is not None:
            scores = scores.masked_fill(keys[None, None, :] > q_pos[lo:hi, None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out


def nearest_config(configs: list[Config], want: Config) -> Config:
    """The config of ``configs`` closest to ``want``, comparing keys in ``want``'s order (see
    :func:`kernels.family.config_steps`): equal categories first, then numbers by powers of two."""
    if not configs:
        raise ValueError(f"no valid config near {want}")
    return min(configs, key=lambda cfg: tuple(config_steps(cfg, want)))


class PrefillFamily(Family):
    name = "attention_prefill"
    template_file = "attention_prefill.py.j2"
    ws_template_file = "attention_prefill_ws.py.j2"
    template_version = 2

    @functools.cached_property
    def template(self) -> str:
        """Both templates' text: the template hash covers the Gluon one too."""
        return generator.template_text(self.template_file) + generator.template_text(self.ws_template_file)

    def template_file_for(self, facts: dict[str, Any]) -> str:
        """The Gluon template for the ws variants, the Triton one for the others."""
        return self.ws_template_file if facts["VARIANT"] in WS_VARIANTS else self.template_file

    # --- search space ---------------------------------------------------------------------------
    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        _, L, _, _, d, _ = _dims(shape)
        torch_dtype(dtype)
        hopper_gpu = not interpreting() and device_facts().capability >= (9, 0)
        tma_ok = (interpreting() or hopper_gpu) and d == head_dim_pad(d)
        tiles = [b for b in (16, 32, 64, 128) if b <= max(16, next_pow2(L))]
        ws_ok = hopper_gpu and d in (64, 128) and dtype in ("float16", "bfloat16") and 128 in tiles
        return {
            "variant": ["ptr", "tma"][:1 + tma_ok] + (list(WS_VARIANTS) if ws_ok else []),
            "BLOCK_M": tiles,
            "BLOCK_N": tiles,
            "num_warps": [4, 8],
            "num_stages": [2, 3, 4],
            "maxnreg": [0, 128, 168],
        }

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        d = head_dim_pad(_dims(shape)[4])
        bm, bn, warps, stages = config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], config["num_stages"]
        if config["variant"] in WS_VARIANTS:
            return self._reject_ws(d, dtype, config)
        regs = (bm * d + bm * bn) // (32 * warps)
        if regs > _MAX_ACC_REGS:
            return f"float32 accumulator {bm}x{d} and scores {bm}x{bn} need {regs} registers per thread with {warps} warps"
        # The smallest tile always passes: at head dim 256 it counts 98 registers, and a kernel that
        # spills beats an empty space (head dims up to 256 must run).
        smallest = bm == bn == 16
        if dtype == "float32" and not smallest and (2 * bm * d + bm * bn + bn * d) // (32 * warps) > MAX_FP32_REGS:
            return f"float32 dots keep the q {bm}x{d} and k {bn}x{d} tiles in registers too: too many with {warps} warps"
        if config["maxnreg"] and config["variant"] != "tma":
            return "a register cap goes with the tma variant only (the ptr variant keeps Q in registers)"
        if config["maxnreg"] and config["maxnreg"] < regs + 32:
            return f"maxnreg={config['maxnreg']} leaves too few registers beside {regs} for accumulator and scores"
        if warps == 8 and bm < 64:
            return "8 warps (two warp groups of 64 rows) need BLOCK_M >= 64"
        if bm * bn // (32 * warps) < 2:
            return f"a {bm}x{bn} score tile leaves threads of {warps} warps idle"
        elt = _elt(dtype)
        smem = bm * d * elt + stages * 2 * bn * d * elt  # Q once, K and V per pipeline stage
        limit = device_facts().smem_per_block
        if smem > limit:
            return f"needs {smem} bytes of shared memory, the device has {limit}"
        return None

    @staticmethod
    def _reject_ws(d: int, dtype: str, config: Config) -> str | None:
        """The warp-specialised kernel: two consumer warp groups of 64 rows (BLOCK_M 128, 4 warps
        each), key blocks of 64 or 128, registers split by the template."""
        if config["BLOCK_M"] != 128 or config["num_warps"] != 4:
            return "the ws variants run BLOCK_M 128 as two consumer warp groups of 4 warps"
        if config["BLOCK_N"] not in (64, 128):
            return "the ws variants take key blocks of 64 or 128"
        if config["maxnreg"]:
            return "the ws variants split registers between their partitions themselves (maxnreg 0)"
        elt = _elt(dtype)
        # Q, the key/value stages, and 8 KB per consumer for the output's layout change.
        smem = 128 * d * elt + config["num_stages"] * 2 * config["BLOCK_N"] * d * elt + 2 * 8192 + 1024
        limit = device_facts().smem_per_block
        if smem > limit:
            return f"needs {smem} bytes of shared memory, the device has {limit}"
        return None

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """On a Hopper GPU in a 16-bit type at head dim 64 or 128: the warp-specialised kernel,
        persistent, key blocks of 128, 2 stages; with ping-pong at D 128 (the best ws configs at
        issue 4's points, results/attention_prefill_ws/NOTES.md). Otherwise the valid config
        nearest the tma leads: tensor descriptors on a Hopper GPU (pointers elsewhere and under the
        interpreter), BLOCK_M 128, BLOCK_N 64; for D 64, 4 warps and 3 stages; for D 128 in
        float32, 8 warps, 2 stages and registers capped at 128, so two programs share an SM; 2
        stages for D 256."""
        d = head_dim_pad(_dims(shape)[4])
        configs = self.configs(shape, dtype)
        ws = {"variant": "wsp_pp" if d == 128 else "wsp", "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4,
              "num_stages": 2, "maxnreg": 0}
        if ws in configs:
            return ws
        tma = not interpreting() and device_facts().is_hopper
        want = {"variant": "tma" if tma else "ptr", "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4 if d <= 64 else 8,
                "num_stages": 3 if d <= 64 else 2, "maxnreg": 128 if tma and d == 128 else 0}
        return nearest_config([c for c in configs if c["variant"] not in WS_VARIANTS] or configs, want)

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        _, _, hq, hkv, d, causal = _dims(shape)
        return {
            "VARIANT": config["variant"],
            "HEAD_DIM": d,
            "HEAD_DIM_PAD": head_dim_pad(d),
            "CAUSAL": causal,
            "GROUP": hq // hkv,
            "BLOCK_M": config["BLOCK_M"],
            "BLOCK_N": config["BLOCK_N"],
            "NUM_WARPS": config["num_warps"],
            "NUM_STAGES": config["num_stages"],
            "MAXNREG": config["maxnreg"],
            "FP32": dtype == "float32",
        }

    # --- running --------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0, *,
                    ragged: bool = False, seqlens: list[int] | None = None) -> dict:
        """q, k, v packed over ``batch`` sequences of ``seqlen`` tokens each (what the cost model
        counts and SDPA can run). ``ragged``: the first keeps ``seqlen``, the others draw lengths in
        1..seqlen. ``seqlens``: the ``batch`` lengths (0..seqlen) to use instead."""
        B, L, hq, hkv, d, causal = _dims(shape)
        dt = torch_dtype(dtype)
        lens = [L] * B
        if seqlens is not None:
            lens = [int(n) for n in seqlens]
            if len(lens) != B or not all(0 <= n <= L for n in lens):
                raise ValueError(f"seqlens must be {B} lengths in 0..{L}, got {seqlens}")
        elif ragged:
            rng = torch.Generator().manual_seed(seed)
            lens[1:] = torch.randint(1, L + 1, (B - 1,), generator=rng).tolist()
        T = sum(lens)
        gen = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (torch.randn(T, h, d, generator=gen, device=device, dtype=dt) for h in (hq, hkv, hkv))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return {"q": q, "k": k, "v": v, "cu_seqlens": cu, "max_seqlen": L, "causal": causal,
                "out": torch.empty_like(q)}

    @staticmethod
    def _args(inputs: dict) -> tuple:
        return tuple(inputs[k] for k in ("q", "k", "v", "cu_seqlens", "max_seqlen"))

    def shape_of(self, inputs: dict) -> Shape:
        return self.shape_from_call(*self._args(inputs), causal=inputs["causal"])

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        return attention.prefill(*self._args(inputs), causal=inputs["causal"], config=config, out=inputs.get("out"))

    def timed_call(self, inputs: dict, config: Config | None) -> Callable[[], Any]:
        """The launch without the host read-back of cu_seqlens (checked by ``run``)."""
        args = self._args(inputs)
        return lambda: attention.prefill(*args, causal=inputs["causal"], config=config, out=inputs["out"],
                                         check_values=False)

    def reference(self, inputs: dict) -> torch.Tensor:
        """Per sequence, float64 softmax attention with the keys repeated per query head."""
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        cu = inputs["cu_seqlens"].tolist()
        scale = 1.0 / math.sqrt(q.shape[2])
        out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
        for lo, hi in zip(cu[:-1], cu[1:]):
            pos = torch.arange(hi - lo, device=q.device) if inputs["causal"] else None
            out[lo:hi] = sdpa_reference(q[lo:hi], k[lo:hi], v[lo:hi], pos, scale)
        return out

    def baseline(self, inputs: dict) -> torch.Tensor | None:
        """torch SDPA on [B, H, L, D] views of the packed tensors (no copy); None for ragged batches."""
        q, k, v, cu = inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens"]
        B, L = cu.shape[0] - 1, inputs["max_seqlen"]
        if q.shape[0] != B * L:
            return None
        q4, k4, v4 = (t.view(B, L, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q4, k4, v4, is_causal=inputs["causal"], enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(q.shape)

    # --- direct calls ---------------------------------------------------------------------------
    def call(self, q, k, v, cu_seqlens, max_seqlen, *, config: Config | None = None, **kwargs: Any) -> torch.Tensor:
        return attention.prefill(q, k, v, cu_seqlens, max_seqlen, config=config, **kwargs)

    def shape_from_call(self, q, k, v, cu_seqlens, max_seqlen, *, causal: bool = True, **_: Any) -> Shape:
        return attention.prefill_shape(q, k, v, cu_seqlens, max_seqlen, causal=causal)

    def bucket(self, shape: Shape) -> Shape:
        """Batch and longest sequence rounded up to powers of two."""
        return {**shape, "batch": next_pow2(shape["batch"]), "seqlen": next_pow2(shape["seqlen"])}

    # --- cost model -----------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        """4 * D flops (q k^T and p v) per (query head, visible key, query) pair of every sequence."""
        B, L, hq, _, d, causal = _dims(shape)
        pairs = L * (L + 1) / 2 if causal else L * L
        return 4.0 * B * hq * d * pairs

    def bytes(self, shape: Shape, dtype: str) -> float:
        """q and out [T, Hq, D] once, k and v [T, Hkv, D] once."""
        B, L, hq, hkv, d, _ = _dims(shape)
        return float(B * L * d * (2 * hq + 2 * hkv) * _elt(dtype))

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"batch": 3, "seqlen": 37, "heads_q": 4, "heads_kv": 2, "head_dim": 64, "causal": True},
            {"batch": 2, "seqlen": 20, "heads_q": 2, "heads_kv": 2, "head_dim": 80, "causal": False},
            {"batch": 2, "seqlen": 1, "heads_q": 8, "heads_kv": 1, "head_dim": 32, "causal": True},
        ]


FAMILY = PrefillFamily()
