"""The model's operators in plain PyTorch: the reference backend (``kernels="torch"``).

Each operator is one method so that a backend can replace any of them with a Triton family
(engine/ops/triton_ops.py). The arithmetic mirrors transformers' Llama step by step (which ops run
in the model dtype and which in float32) so that greedy tokens agree token for token.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.ops.paged_attention_torch import paged_attention
from kernels.kv_store import kv_store_torch_padded

if TYPE_CHECKING:  # the model module imports this one
    from engine.models.llama import AttentionMetadata


class TorchOps:
    """Operators of the Llama forward pass, computed by PyTorch."""

    name = "torch"

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ weight[N, K]^T -> [T, N] in x's dtype."""
        return F.linear(x, weight)

    def rmsnorm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm with the residual add fused in front.

        x [T, H], weight [H], residual [T, H] or None. Returns (normed [T, H], new residual [T, H])
        where new residual = x + residual (x itself when residual is None), summed in the model
        dtype, and normed = weight * (r / sqrt(mean(r^2) + eps)) with the statistics in float32.
        """
        r = x if residual is None else x + residual
        r32 = r.float()
        normed = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(r.dtype), r

    def fuses_into_gemv(self, rows: int) -> bool:
        """Whether :meth:`norm_linear` and :meth:`silu_linear` run as one kernel each for ``rows``
        rows (never here)."""
        return False

    def norm_linear(
        self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, residual: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block's RMSNorm and the linear layer after it: (linear(rmsnorm(x, residual)),
        new residual). x [T, H], norm_w [H], residual [T, H] or None, weight [N, H] -> ([T, N], [T, H]).
        Here the two operators in turn; a backend may run them as one kernel."""
        normed, residual = self.rmsnorm(x, norm_w, eps, residual)
        return self.linear(normed, weight), residual

    def embed_norm_linear(
        self, ids: torch.Tensor, embed: torch.Tensor, norm_w: torch.Tensor, eps: float, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's start: the embedding rows embed[ids], then :meth:`norm_linear` of them
        without a residual. ids [T], embed [V, H] -> (linear(rmsnorm(h)) [T, N], h [T, H]). A backend
        may run it as one kernel."""
        return self.norm_linear(embed[ids], norm_w, eps, None, weight)

    def silu_linear(self, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A Llama MLP's activation and down projection: linear(silu_mul(gate_up), weight).
        gate_up [T, 2I], weight [H, I] -> [T, H]. Here the two operators in turn; a backend may
        run them as one kernel."""
        return self.linear(self.silu_mul(gate_up), weight)

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by their tokens' positions [T] (int).

        cos_sin [max_positions, D] float32 holds cos then sin of each position's D/2 angles
        (``kernels.rope.rope_cache``). The rotation runs in the model dtype with cos and sin
        rounded to it, as transformers does: x * cos + rotate_half(x) * sin.
        """
        half = q.shape[-1] // 2
        rows = cos_sin[positions].to(q.dtype)  # [T, D]
        cos = torch.cat((rows[:, :half], rows[:, :half]), dim=-1)[:, None, :]  # [T, 1, D]
        sin = torch.cat((rows[:, half:], rows[:, half:]), dim=-1)[:, None, :]
        for x in (q, k):
            rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
            x.copy_(x * cos + rotated * sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU activation: gate_up [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def kv_store(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write the step's new k, v [T, Hkv, D] into the paged caches [num_blocks, block_size, Hkv, D].

        slot_mapping [T] (int): flat slot ``block * block_size + offset`` of each token; a negative
        slot (a padding row of the padded decode path) writes nothing, as in the kv_store kernel.
        """
        kv_store_torch_padded(k, v, k_cache, v_cache, slot_mapping)

    def rope_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """:meth:`rope` on q and k, then :meth:`kv_store` of the rotated k and v. A backend may
        override it to run them as one kernel."""
        self.rope(q, k, positions, cos_sin)
        self.kv_store(k, v, k_cache, v_cache, slot_mapping)

    def fuses_rope_attention(self, max_seqlen_q: int) -> bool:
        """Whether :meth:`rope_attention` runs as one kernel for a step whose longest query is
        ``max_seqlen_q`` (never here)."""
        return False

    def rope_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                       sm_scale: float) -> torch.Tensor:
        """A Llama attention block after its QKV projection: :meth:`rope_store` of the step's q, k, v
        [T, H*, D] by ``meta.slot_mapping``, then :meth:`paged_attention` of q over the cache with
        ``meta``'s tables and lengths -> [T, Hq, D]. A backend may run them as one kernel (q and k are
        then left unrotated in memory: read only the output)."""
        self.rope_store(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
        return self.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                                    meta.max_seqlen_q, sm_scale, meta.max_context_len)

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
        """Attention of each sequence's new queries against its paged cache (see paged_attention_torch).

        ``max_context_len`` (the longest context, when the caller knows it) is a hint for kernels
        choosing a config; the PyTorch path reads the lengths themselves.
        """
        return paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q, sm_scale=sm_scale)
