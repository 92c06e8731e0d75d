"""Argument checks shared by the direct-call functions of the fused families.

Each check raises ``TypeError`` (not a tensor, wrong dtype) or ``ValueError`` (wrong rank, shape,
device or layout) with a message that starts with the calling function's name and names the
argument, so a user sees which argument of which call is wrong.
"""
from __future__ import annotations

import torch

from kernels.family import DTYPES

INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(fn: str, name: str, t: object, dims: int) -> torch.Tensor:
    """``t`` if it is a tensor of rank ``dims``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{fn}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def float_dtype(fn: str, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """``t`` holds float16, bfloat16 or float32 (and ``like``'s dtype when given)."""
    if t.dtype not in DTYPES.values():
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}; expected one of {sorted(DTYPES)}")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but must match the input's {like.dtype}")


def index_dtype(fn: str, name: str, t: torch.Tensor) -> None:
    """``t`` holds int32 or int64 indices."""
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}; expected torch.int32 or torch.int64")


def same_device(fn: str, **tensors: torch.Tensor) -> None:
    """Every tensor lives on one device."""
    (first, ref), *rest = tensors.items()
    for name, t in rest:
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first} is on {ref.device}")


def shape(fn: str, name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    """``t.shape == expected``; ``what`` spells the expected shape symbolically, e.g. ``[T, H]``."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{fn}: {name} must be {what} = {list(expected)}, got {list(t.shape)}")


def unit_last_stride(fn: str, name: str, t: torch.Tensor) -> None:
    """The last dim is contiguous (kernels vectorise along it; other strides may be anything)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{fn}: {name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
