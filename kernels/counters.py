"""Arrival counters: the last program of a split reduction finishes it, with no second kernel.

Split-K GEMM and split-KV decode attention cut one output tile's work across several programs.
Instead of a second launch that sums the slices, each program writes its partial result, then
increments the tile's counter (one device-scope acq_rel atomic after a barrier, so every thread's
stores are visible first); the program that sees the count reach SPLIT - 1 arrived last, reads
the partials back and writes the output, then sets the counter back to 0. A launch therefore leaves
every counter at zero, ready for the next one, which is what lets the same buffer serve every
launch and every CUDA-graph replay without a memset.

One buffer per (device, stream): kernels on one stream run one after another, so they never share
a counter while both are in flight; two streams get two buffers.
"""
from __future__ import annotations

import torch

MIN_COUNTERS = 1 << 16  # 256 KiB of int32: more tiles than any launch of the suites and the engine
_BUFFERS: dict[tuple[str, int], torch.Tensor] = {}


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def arrival_counters(device: torch.device | str, n: int) -> torch.Tensor:
    """int32 [>= n] counters on ``device``, all zero between launches (see the module docstring).

    Raises ``RuntimeError`` when the buffer would have to grow during CUDA-graph capture: a
    buffer allocated inside a capture belongs to the graph's memory pool. Run the shape once
    eagerly first (the engine and the tuner always do), and the capture finds it allocated.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), _stream_id(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"arrival counters for {n} tiles on {device} were not allocated before CUDA-graph "
                               "capture; launch the kernel once eagerly before capturing it")
        buf = torch.zeros(max(n, MIN_COUNTERS, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.int32,
                          device=device)
        _BUFFERS[key] = buf
    return buf
