"""Token sampling, vectorised over the batch.

For a batch of logits [B, V] (float32) and each row's temperature, top-k and top-p:
- greedy rows (temperature 0) take the argmax of the raw logits;
- other rows divide by their temperature, keep their top_k largest logits (0: all), keep the
  smallest prefix of the sorted distribution whose probability reaches top_p (the most likely
  token always stays), and draw from the renormalised rest by the exponential race
  ``argmax(p_i / E_i)`` with E_i ~ Exp(1), which picks token i with probability p_i.
Rows with a seed draw their noise E from their own ``torch.Generator``, advanced by exactly V draws
per sampled token, so a seeded request's tokens do not depend on its neighbours in the batch nor
on preemption; unseeded rows share the engine's generator.
"""
from __future__ import annotations

import math

import torch

ARGMAX_CHUNKS = 256  # at most this many row chunks in the first pass of greedy_argmax


def greedy_argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` [R] (int64) of logits [R, V], in two passes that keep the GPU busy.

    One row's argmax over a vocabulary of 128K is a single-output reduction, which PyTorch runs
    on a few SMs: 37 us for one row of llama-3.2-1b's logits on an H200 (cold L2), against 12 us
    this way (results/bench_engine_nvidia_h200/windows_gemv/argmax.csv). Here each row is cut into C equal chunks (C the largest divisor of V
    that divides ARGMAX_CHUNKS): the first pass takes every chunk's maximum and its index (R x C
    outputs in parallel), the second the first chunk holding the row's maximum. Both passes return
    the first of equal maxima, so the result is the first maximum of the row, as argmax's.
    Vocabularies with fewer than 16 such chunks take ``argmax`` directly. ``out``: an int64 [R]
    tensor to write the result into.
    """
    if math.gcd(logits.shape[1], ARGMAX_CHUNKS) < 16:
        return torch.argmax(logits, dim=-1, out=out)
    best, where, width = chunk_maxima(logits)
    chunk = best.argmax(dim=-1, keepdim=True)  # [R, 1]
    return torch.add(where.gather(1, chunk)[:, 0], chunk[:, 0], alpha=width, out=out)


def chunk_maxima(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first pass of :func:`greedy_argmax`: (best [R, C], where [R, C], width) for logits [R, V]
    cut into C chunks of ``width`` (C the largest divisor of V dividing ARGMAX_CHUNKS): each chunk's
    maximum and the index within the chunk of its first occurrence."""
    R, V = logits.shape
    chunks = math.gcd(V, ARGMAX_CHUNKS)
    best, where = logits.reshape(R, chunks, V // chunks).max(dim=-1)
    return best, where, V // chunks


class Sampler:
    """Draws one token per row of a logits batch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.seed()

    def request_generator(self, seed: int) -> torch.Generator:
        """A generator for one seeded request (kept by the request across steps)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Tokens [B] (int64) for logits [B, V] float32; temperature and top_p [B] float32,
        top_k [B] int64 (0: no limit), one generator or None per row."""
        greedy_tokens = greedy_argmax(logits)
        greedy = temperature == 0
        if bool(greedy.all()):
            return greedy_tokens
        V = logits.shape[1]
        scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=logits.device)
        drop = ranks[None, :] >= torch.where(top_k > 0, top_k, V)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (rows with top_p 1 keep
        # all: their cumulative sum may round to 1 before the last token).
        drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        probs = probs.masked_fill(drop, 0.0)
        noise = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            noise[shared] = torch.empty(len(shared), V, device=logits.device).exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        # A zero draw would turn a dropped token's 0 / 0 into NaN, which argmax would pick.
        choice = (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        sampled = order.gather(1, choice[:, None])[:, 0]
        return torch.where(greedy, greedy_tokens, sampled)
