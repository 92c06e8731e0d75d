"""Operator backends of the model: ``"torch"`` (reference) and ``"triton"`` (kernels/ families)."""
from __future__ import annotations

import os

from engine.ops.torch_ops import TorchOps

BACKENDS = ("triton", "torch")
CONFIG_MODES = ("tuned", "default")  # where the Triton backend's configs come from


def get_ops(name: str, *, configs: str = "tuned", cache_path: str | os.PathLike | None = None) -> TorchOps:
    """The operator set called ``name``; ``ValueError`` for an unknown one.

    ``configs`` and ``cache_path`` apply to "triton": "tuned" looks configs up in the best-config
    cache at ``cache_path`` (None: the device's default file), "default" uses the families' defaults.
    """
    if name == "torch":
        return TorchOps()
    if name == "triton":
        from engine.ops.triton_ops import TritonOps  # imports autotune and the families only when asked

        return TritonOps(configs, cache_path)
    raise ValueError(f"kernels must be one of {list(BACKENDS)}, got {name!r}")
