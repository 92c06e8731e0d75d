"""The Triton backend (``kernels="triton"``): every operator of the Llama forward pass is a kernels/
family, launched with the config the autotuner's cache holds for the shape it runs.

    operator          family            what it launches
    linear            gemm              x [T, K] @ W.t(): B is the transposed view of the row-major
                                        weight [N, K] (the family's ``b_transposed`` layout)
    rmsnorm           rmsnorm           the residual add fused in, the new residual written in place
    norm_linear       norm_gemv         up to 4 rows (decode): rmsnorm and the linear after it as one
                                        kernel, the new residual in a fresh buffer; more rows: the
                                        rmsnorm and gemm families in turn
    embed_norm_linear norm_gemv         up to 4 rows: the embedding lookup inside the first layer's
                                        norm_gemv (its gather shape); more rows: the lookup, then
                                        norm_linear
    silu_linear       silu_gemv         up to 4 rows: silu_mul and the down projection as one kernel;
                                        more rows: the silu_mul and gemm families in turn
    rope              rope              q and k rotated in place (views of the fused QKV output)
    rope_store        rope              the same kernel storing the rotated k and v into the paged
                                        cache too (the kv_store family's write; negative slots, the
                                        padding, skipped): rope and kv_store as one launch
    silu_mul          silu_mul          silu(gate) * up of the fused gate/up output
    paged_attention   attention_paged   decode, chunked prefill and mixed batches
    rope_attention    attention_paged   decode steps: rope, the KV store and attention as one launch (the
                                        family's rope shapes); steps with longer queries: rope_store,
                                        then paged_attention

``configs="tuned"``: each call goes through ``autotune.tuned(family)``, which looks the config up once
per (bucketed) shape -- the exact cached shape, else the nearest cached one, else the family's
default -- and memoises it, so a later call costs the shape extraction and a dict lookup.
``configs="default"``: the family's heuristic default config (the A/B baseline of tuning).

Hot path: every output is allocated here and passed as ``out`` (the dry run below needs that);
attention gets the longest context from the host (``max_context_len``) and skips the read-back of
its metadata (``check_values=False``: the model runner built it), so a step makes no host sync
and the decode step can be captured in a CUDA graph.

Dry run (``with ops.dry_run() as resolved``): operators resolve their configs and record
(family, dtype, shape) -> (config, source) without launching anything; the engine's warm-up runs
its step shapes this way to list the exact shapes it will launch and to tune them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

import autotune
import kernels
from engine.ops import CONFIG_MODES
from engine.ops.torch_ops import TorchOps
from kernels.family import Config, dtype_name
from kernels.gemm import GEMV_MAX_M

if TYPE_CHECKING:  # the model module imports the ops
    from engine.models.llama import AttentionMetadata

FAMILIES = ("gemm", "rmsnorm", "norm_gemv", "rope", "silu_mul", "silu_gemv", "attention_paged")

# (family, dtype, JSON of the bucketed shape) -> what the dry run resolved for it.
ResolvedKey = tuple[str, str, str]


def _first_dtype(args: tuple, kwargs: dict) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return dtype_name(value.dtype)
    raise TypeError("an operator call without a tensor argument")


class TritonOps(TorchOps):
    """Operators of the Llama forward pass on kernels/ families (see the module docstring)."""

    name = "triton"

    def __init__(self, configs: str = "tuned", cache_path: str | os.PathLike | None = None) -> None:
        if configs not in CONFIG_MODES:
            raise ValueError(f"kernel configs must be one of {list(CONFIG_MODES)}, got {configs!r}")
        self.configs = configs
        self.cache_path = cache_path
        self._dispatch = {f: autotune.tuned(f, cache_path=cache_path) for f in FAMILIES} if configs == "tuned" else {}
        self._launchers: dict[str, Callable[..., Any]] = (
            dict(self._dispatch) if configs == "tuned"
            else {f: functools.partial(kernels.get_family(f).call, config=None) for f in FAMILIES}
        )
        self._fn = self._launchers

    # --- config resolution ----------------------------------------------------------------------
    def resolve(self, family: str, shape: dict[str, Any], dtype: str) -> tuple[Config, str]:
        """(config, source) a call of ``family`` at ``shape`` launches with; source is "exact",
        "nearest" or "default". Raises ``ValueError`` when the family has no valid config."""
        fam = kernels.get_family(family)
        shape = fam.bucket(shape)
        config, source = self._dispatch[family].config_for(shape, dtype) if self.configs == "tuned" else (None, "default")
        return (fam.default_config(shape, dtype) if config is None else config), source

    def refresh(self) -> None:
        """Reread the best-config cache at the next call (after tuning)."""
        for d in self._dispatch.values():
            d.refresh()

    @contextlib.contextmanager
    def dry_run(self) -> Iterator[dict[ResolvedKey, dict[str, Any]]]:
        """Within the block, operators only resolve and record their configs (outputs stay empty)."""
        resolved: dict[ResolvedKey, dict[str, Any]] = {}

        def recorder(family: str) -> Callable[..., None]:
            fam = kernels.get_family(family)

            def record(*args: Any, **kwargs: Any) -> None:
                shape = fam.bucket(fam.shape_from_call(*args, **kwargs))
                dtype = _first_dtype(args, kwargs)
                key = (family, dtype, json.dumps(shape, sort_keys=True))
                if key not in resolved:
                    config, source = self.resolve(family, shape, dtype)
                    resolved[key] = {"family": family, "dtype": dtype, "shape": shape, "config": config,
                                     "source": source}

            return record

        self._fn = {f: recorder(f) for f in FAMILIES}
        try:
            yield resolved
        finally:
            self._fn = self._launchers

    # --- operators ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ weight[N, K]^T -> [T, N] in x's dtype."""
        out = x.new_empty(x.shape[0], weight.shape[0])
        self._fn["gemm"](x, weight.t(), out=out)
        return out

    def rmsnorm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed [T, H], new residual [T, H]); with a residual the sum is written into it in place
        and the normed rows over x (both are dead afterwards); without, x is the new residual."""
        if residual is None:
            out = torch.empty_like(x)
            self._fn["rmsnorm"](x, weight, eps, out=out)
            return out, x
        self._fn["rmsnorm"](x, weight, eps, residual=residual, out=x, residual_out=residual)
        return x, residual

    def fuses_into_gemv(self, rows: int) -> bool:
        """Up to GEMV_MAX_M rows (decode batches), :meth:`norm_linear` and :meth:`silu_linear` are
        one kernel each (norm_gemv, silu_gemv)."""
        return rows <= GEMV_MAX_M

    def norm_linear(
        self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, residual: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear(rmsnorm(x, residual)) [T, N], new residual [T, H]). Up to GEMV_MAX_M rows one
        norm_gemv kernel, which saves the norm's launch in a decode step; more rows the two families."""
        if not self.fuses_into_gemv(x.shape[0]):
            return super().norm_linear(x, norm_w, eps, residual, weight)
        out = x.new_empty(x.shape[0], weight.shape[0])
        if residual is None:
            self._fn["norm_gemv"](x, norm_w, eps, weight, out=out)
            return out, x
        new_residual = torch.empty_like(x)  # not in place: the kernel's programs all read residual
        self._fn["norm_gemv"](x, norm_w, eps, weight, residual=residual, out=out, residual_out=new_residual)
        return out, new_residual

    def embed_norm_linear(
        self, ids: torch.Tensor, embed: torch.Tensor, norm_w: torch.Tensor, eps: float, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As TorchOps.embed_norm_linear; up to GEMV_MAX_M rows one norm_gemv kernel that reads the
        embedding rows itself and writes them out as the residual stream (its gather shape): the
        lookup's own kernel (4.8 us of a batch-1 decode graph on an H200) leaves the step."""
        if not self.fuses_into_gemv(ids.shape[0]):
            return super().embed_norm_linear(ids, embed, norm_w, eps, weight)
        out = embed.new_empty(ids.shape[0], weight.shape[0])
        rows = embed.new_empty(ids.shape[0], embed.shape[1])
        self._fn["norm_gemv"](embed, norm_w, eps, weight, ids=ids, out=out, residual_out=rows)
        return out, rows

    def silu_linear(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """linear(silu_mul(gate_up), weight) [T, H]: up to GEMV_MAX_M rows one silu_gemv kernel
        (the activation's launch saved), more rows the two families."""
        if not self.fuses_into_gemv(gate_up.shape[0]):
            return super().silu_linear(gate_up, weight)
        out = gate_up.new_empty(gate_up.shape[0], weight.shape[0])
        self._fn["silu_gemv"](gate_up, weight, out=out)
        return out

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by their tokens' positions [T]."""
        self._fn["rope"](q, k, positions, cos_sin)

    def rope_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
        """As TorchOps.rope_store, in one rope launch: the kv_store launch is saved."""
        self._fn["rope"](q, k, positions, cos_sin, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] -> silu(gate) * up [T, I]."""
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        self._fn["silu_mul"](gate_up, out=out)
        return out

    def fuses_rope_attention(self, max_seqlen_q: int) -> bool:
        """Decode steps (one query per sequence) run :meth:`rope_attention` as one kernel."""
        return max_seqlen_q == 1

    def rope_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                       sm_scale: float) -> torch.Tensor:
        """As TorchOps.rope_attention; a decode step in one attention_paged launch, which rotates q
        and k by each query's position context_lens - 1 (the engine's decode positions: ``positions``
        is not read) and stores k and v. On an H200 it took the batch-1 decode graph from 889 to 856
        us and the served step from 0.913 to 0.884 ms (results/bench_engine_nvidia_h200/rope_attention/)."""
        if not self.fuses_rope_attention(meta.max_seqlen_q):
            return super().rope_attention(q, k, v, positions, cos_sin, k_cache, v_cache, meta, sm_scale)
        return self._attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                               meta.max_seqlen_q, sm_scale, meta.max_context_len, k_new=k, v_new=v, cos_sin=cos_sin,
                               slot_mapping=meta.slot_mapping)

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        context_lens: torch.Tensor,
        max_seqlen_q: int,
        sm_scale: float,
        max_context_len: int | None = None,
    ) -> torch.Tensor:
        """out [T, Hq, D] (contiguous). ``max_context_len`` (host-known) picks the config; without it
        the block table's capacity bounds the context."""
        return self._attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, sm_scale,
                               max_context_len)

    def _attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_seqlen_q: int, sm_scale: float,
                   max_context_len: int | None, **new_kv: torch.Tensor) -> torch.Tensor:
        """One attention_paged launch into a fresh out [T, Hq, D]; ``new_kv``: the fused rotation's
        k_new, v_new, cos_sin and slot_mapping (``kernels.attention.paged``)."""
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self._fn["attention_paged"](
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
            sm_scale=sm_scale, max_context_len=max_context_len, check_values=False, out=out, **new_kv,
        )
        return out
