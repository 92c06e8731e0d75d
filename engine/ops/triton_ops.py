"""The Triton backend (``kernels="triton"``): operators launched from kernels/ families.

In this issue attention runs on the paged attention family; the other operators are inherited from
the PyTorch backend until their families exist (each is one method to override).
"""
from __future__ import annotations

import torch

import kernels
from engine.ops.torch_ops import TorchOps


class TritonOps(TorchOps):
    """Operators of the Llama forward pass with attention on ``kernels.attention.paged``."""

    name = "triton"

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
        # max_context_len (known on the host) picks the config without reading context_lens back.
        return kernels.attention.paged(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
            sm_scale=sm_scale, max_context_len=max_context_len,
        )
