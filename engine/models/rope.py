"""Rotary position embedding tables: inverse frequencies per RoPE type and the cos/sin cache.

Llama rotates each head's vector as two halves (x1 = x[:D/2], x2 = x[D/2:]):
``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` and angles
``position * inv_freq[i]``, ``inv_freq[i] = theta^(-2i/D)`` for i < D/2. Scaling variants change
only ``inv_freq``:
- ``linear``: every frequency divided by ``factor`` (positions interpolated);
- ``llama3``: wavelengths longer than ``original_max / low_freq_factor`` divided by ``factor``,
  shorter than ``original_max / high_freq_factor`` kept, and a smooth blend in between.
"""
from __future__ import annotations

import math

import torch

from engine.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, for ``rope``'s type."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return freq / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return freq


def cos_sin_cache(rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device) -> torch.Tensor:
    """The table [max_positions, 2, head_dim // 2] float32: cos and sin of every position's angles.

    Angles are ``position * inv_freq`` in float32, the product transformers forms, so both round alike.
    """
    freq = inv_freq(rope, head_dim).to(device)
    angles = torch.arange(max_positions, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.stack((angles.cos(), angles.sin()), dim=1)
