"""Operator backends of the model: ``"torch"`` (reference) and ``"triton"`` (kernels/ families)."""
from __future__ import annotations

from engine.ops.torch_ops import TorchOps

BACKENDS = ("triton", "torch")


def get_ops(name: str) -> TorchOps:
    """The operator set called ``name``; ``ValueError`` for an unknown one."""
    if name == "torch":
        return TorchOps()
    if name == "triton":
        from engine.ops.triton_ops import TritonOps  # imports kernels' attention family only when asked

        return TritonOps()
    raise ValueError(f"kernels must be one of {list(BACKENDS)}, got {name!r}")
