"""The Llama forward pass over a paged KV cache.

Weights are kept fused as loaded (engine/loader.py): per layer one QKV projection
[(Hq + 2 Hkv) * D, H] and one gate/up projection [2 I, H]. Every operator goes through the backend
(engine/ops), one call each, so a backend can move any of them onto a Triton kernel:

    per layer:  qkv, r = norm_linear(h, r, Wqkv)  (rmsnorm, residual add fused, then the linear layer;
                                                  one kernel for decode rows; on the first layer
                                                  embed_norm_linear(ids): h = r = embed[ids], the
                                                  lookup inside that kernel)
                q, k, v = split(qkv); a = rope_attention(q, k, v, positions, cache, meta)
                                                 (rope, the rotated k and v into the paged cache by
                                                  slot, attention of q over the cache; on the Triton
                                                  backend one kernel for decode steps, two otherwise)
                h = linear(a, Wo)
                gu, r = norm_linear(h, r, Wgate_up); h = silu_linear(gu, Wdown)
                                                  (silu_mul then the linear layer; one kernel for decode rows)
    final:      x, _ = rmsnorm(h, r); logits = linear(x[rows], Wlm_head)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.ops.torch_ops import TorchOps
from kernels.rope import rope_cache


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, H]
    o: torch.Tensor  # [H, Hq * D]
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the embedding itself when tied

    def decode_bytes(self) -> int:
        """Bytes of weights a decode step reads: every layer's, the final norm's and the LM head's (the
        embedding adds only its rows of the step's tokens). Over the copy bandwidth: the step's floor."""
        tensors = [t for layer in self.layers for t in vars(layer).values()] + [self.norm, self.lm_head]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class AttentionMetadata:
    """What one step's attention needs, for B sequences packing T new tokens.

    slot_mapping [T] int64, block_tables [B, max_blocks] int32, cu_seqlens_q [B + 1] int32,
    context_lens [B] int32 (cached tokens per sequence, this step's included), and on the host
    max_seqlen_q (longest query) and max_context_len (longest context).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    max_seqlen_q: int
    max_context_len: int


class LlamaModel:
    """A Llama model bound to its weights, its operator backend and its RoPE table."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights, ops: TorchOps, device: torch.device) -> None:
        self.config = config
        self.weights = weights
        self.ops = ops
        # [max_positions, D] float32: cos(p * inv_freq) then sin(p * inv_freq), the rope family's layout.
        self.cos_sin = rope_cache(
            config.head_dim, config.max_position_embeddings, config.rope.theta, config.rope.scaling(), device=device
        )
        self.sm_scale = config.head_dim**-0.5

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_caches: torch.Tensor,
        v_caches: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states [T, H] after the final norm, for input_ids and positions [T] (int64).

        k_caches and v_caches [num_layers, num_blocks, block_size, Hkv, D] receive the new K and V.
        """
        cfg, ops, w = self.config, self.ops, self.weights
        T = input_ids.shape[0]
        h = residual = None
        for i, layer in enumerate(w.layers):
            if i == 0:  # the embedding lookup and the first norm: one kernel for decode rows
                qkv, residual = ops.embed_norm_linear(input_ids, w.embed, layer.input_norm, cfg.rms_norm_eps, layer.qkv)
            else:
                qkv, residual = ops.norm_linear(h, layer.input_norm, cfg.rms_norm_eps, residual, layer.qkv)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.reshape(T, cfg.num_heads, cfg.head_dim)
            k = k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
            attn = ops.rope_attention(q, k, v, positions, self.cos_sin, k_caches[i], v_caches[i], meta, self.sm_scale)
            h = ops.linear(attn.reshape(T, cfg.q_size), layer.o)
            gate_up, residual = ops.norm_linear(h, layer.post_norm, cfg.rms_norm_eps, residual, layer.gate_up)
            h = ops.silu_linear(gate_up, layer.down)
        out, _ = ops.rmsnorm(h, w.norm, cfg.rms_norm_eps, residual)
        return out

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, H] -> logits [R, V] in the model dtype (as transformers computes them)."""
        return self.ops.linear(hidden, self.weights.lm_head)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, H] -> logits [R, V] float32: :meth:`lm_head`'s, converted."""
        return self.lm_head(hidden).float()
