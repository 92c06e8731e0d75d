"""Kernel families: generated Triton variants, their search spaces, references and cost models.

Importing this package selects Triton's interpreter when no CUDA GPU is present (before Triton
itself is imported), so everything below runs on a CPU-only machine too.
"""
from __future__ import annotations

import importlib

from kernels.device import select_backend

select_backend()

from kernels.family import Family  # noqa: E402  (after the backend is chosen)

# Family name -> module defining FAMILY. Modules import lazily: asking for one family does not
# compile or import the others.
_FAMILY_MODULES: dict[str, str] = {
    "gemm": "kernels.gemm",
    "attention_prefill": "kernels.attention_prefill",
    "attention_paged": "kernels.attention_paged",
    "rmsnorm": "kernels.rmsnorm",
    "rope": "kernels.rope",
    "silu_mul": "kernels.silu_mul",
    "kv_store": "kernels.kv_store",
    "norm_gemv": "kernels.norm_gemv",
    "silu_gemv": "kernels.silu_gemv",
}


def family_names() -> list[str]:
    """Names of every registered kernel family."""
    return list(_FAMILY_MODULES)


def get_family(name: str) -> Family:
    """The family called ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str) or name not in _FAMILY_MODULES:
        raise ValueError(f"unknown kernel family {name!r}; known families are {family_names()}")
    return importlib.import_module(_FAMILY_MODULES[name]).FAMILY


def __getattr__(attr: str):
    # `kernels.gemm.matmul` and `kernels.attention.prefill` work after a bare `import kernels`.
    if attr in ("gemm", "attention") or attr in _FAMILY_MODULES:
        return importlib.import_module(f"kernels.{attr}")
    raise AttributeError(f"module 'kernels' has no attribute {attr!r}")
