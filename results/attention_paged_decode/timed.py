"""The timing loop that the decode probe scripts (``probe.py``, ``warp_parts.py``) share."""
from __future__ import annotations

from typing import Callable

from autotune.timing import gpu_time
from kernels.family import Family


def time_each(fam: Family, shape: dict, dtype: str, meta: dict, timed: dict[str, Callable[[], object]],
              gpu: bool) -> list[dict]:
    """A row per entry of ``timed`` (name -> zero-argument launch): the median us of cold-L2
    CUDA-graph replays and the TB/s of the family's byte count, with ``meta`` and ``shape``. On the
    CPU (a smoke run) each launch runs once and its time is NaN."""
    rows = []
    for name, fn in timed.items():
        if gpu:
            ms = gpu_time(fn)[0]
        else:
            fn()
            ms = float("nan")
        rows.append({**meta, "dtype": dtype, **shape, "what": name, "us": ms * 1e3,
                     "TBps": fam.bytes(shape, dtype) / ms / 1e9})
        print(f"B{shape['batch']} L{shape['context_len']} {name}: {ms * 1e3:.2f} us", flush=True)
    return rows
