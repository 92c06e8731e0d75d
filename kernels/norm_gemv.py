"""The norm_gemv family: a pre-norm block's RMSNorm and the linear layer after it, for decode rows.

    h = x + residual                      (only with a residual; h is the new residual stream)
    C = (h * rsqrt(mean(h^2) + eps) * norm_w) @ W^T

for M <= 4 rows (batch-1 to batch-4 decode), in one kernel instead of an rmsnorm kernel and a
GEMV. The norm scales each row by one number, so the kernel accumulates the row's sum of squares
in the same pass over K as the products and applies it at the end (see the template,
``kernels/templates/gemv_prologue.py.j2``). At decode sizes both kernels are bound by latency more
than by bytes (the rmsnorm of one 2048-wide row moves 12 KB), so one launch fewer per norm is the
saving; the GEMV's own traffic (W) is unchanged.

Shape dicts are ``{"M", "N", "K", "residual"}``: x [M, K], W [N, K] (a linear layer's weight).
Space, constraints and default: ``kernels/gemv_prologue.py``. A shape with ``"gather": True`` (and no
residual) is a decode step's first norm with the embedding lookup fused in: the rows are ids [M]
of a table x [V, K], and the gathered rows go out as the residual stream (``norm_gemv``'s ``ids``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from kernels import checks
from kernels.family import Config, Shape, dtype_name, torch_dtype
from kernels.gemv_prologue import GemvPrologueFamily, check_rows, gemv_dims
from kernels.rmsnorm import rmsnorm_torch

EPS = 1e-5  # make_inputs' epsilon (Llama 3 uses 1e-5)


def _dims(shape: Shape) -> tuple[int, int, int, bool]:
    return (*gemv_dims("norm_gemv", shape), bool(shape.get("residual", False)))


def _gather(shape: Shape) -> bool:
    """Whether ``shape`` fuses the embedding lookup (``ValueError`` with a residual as well)."""
    if shape.get("gather", False) and shape.get("residual", False):
        raise ValueError("norm_gemv: gather (the first norm, over embedding rows) takes no residual")
    return bool(shape.get("gather", False))


class NormGemvFamily(GemvPrologueFamily):
    name = "norm_gemv"
    prologue = "rmsnorm"
    template_version = 1
    # The winner tuned at gate/up, 16384x2048: 21.4 us on an H200 (see GemvPrologueFamily.default_config).
    default_tile = {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 1, "num_stages": 1}

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        return {**self.tile_facts(shape, config), "RESIDUAL": _dims(shape)[3], "GATHER": _gather(shape)}

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        """x, norm weight, W (and residual) random; ``out`` is C [M, N], or with a residual the list
        [C [M, N], new residual [M, K]]. A gather shape's x is a table of 2M + 3 rows and ids [M] pick
        rows of it (one twice when M > 1), the list [C, gathered rows] its out."""
        M, N, K, residual = _dims(shape)
        dt = torch_dtype(dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        inputs = {
            "x": torch.randn(M, K, generator=gen).to(device=device, dtype=dt),
            "norm_w": (1.0 + 0.5 * torch.randn(K, generator=gen)).to(device=device, dtype=dt),
            "weight": (torch.randn(N, K, generator=gen) / K**0.5).to(device=device, dtype=dt),
            "eps": EPS,
            "out": torch.empty(M, N, device=device, dtype=dt),
        }
        if residual:
            inputs["residual"] = torch.randn(M, K, generator=gen).to(device=device, dtype=dt)
            inputs["out"] = [inputs["out"], torch.empty(M, K, device=device, dtype=dt)]
        if _gather(shape):
            inputs["x"] = torch.randn(2 * M + 3, K, generator=gen).to(device=device, dtype=dt)
            ids = torch.randperm(2 * M + 3, generator=gen)[:M]
            ids[-1] = ids[0]
            inputs["ids"] = ids.to(device)
            inputs["out"] = [inputs["out"], torch.empty(M, K, device=device, dtype=dt)]
        return inputs

    def shape_of(self, inputs: dict) -> Shape:
        return self.shape_from_call(inputs["x"], inputs["norm_w"], inputs["eps"], inputs["weight"],
                                    residual=inputs.get("residual"), ids=inputs.get("ids"))

    def _launch(self, inputs: dict, config: Config | None) -> Callable[[], Any]:
        out = inputs["out"]
        if isinstance(out, torch.Tensor):
            return lambda: norm_gemv(inputs["x"], inputs["norm_w"], inputs["eps"], inputs["weight"], config=config,
                                     out=out)
        out, res_out = out
        return lambda: norm_gemv(inputs["x"], inputs["norm_w"], inputs["eps"], inputs["weight"],
                                 residual=inputs.get("residual"), ids=inputs.get("ids"), config=config, out=out,
                                 residual_out=res_out)

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        self._launch(inputs, config)()
        out = inputs["out"]
        return out if isinstance(out, torch.Tensor) else torch.cat(out, dim=1)

    def timed_call(self, inputs: dict, config: Config | None) -> Callable[[], Any]:
        """The launch alone: ``run`` also joins C and the new residual into one tensor to compare."""
        return self._launch(inputs, config)

    def _rows(self, inputs: dict) -> torch.Tensor:
        """The rows the norm sees: x, or x's rows ids (gather)."""
        return inputs["x"] if inputs.get("ids") is None else inputs["x"][inputs["ids"]]

    def reference(self, inputs: dict) -> torch.Tensor:
        h = self._rows(inputs).double()
        if inputs.get("residual") is not None:
            h = h + inputs["residual"].double()
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + inputs["eps"]) * inputs["norm_w"].double()
        out = y @ inputs["weight"].double().t()
        return out if isinstance(inputs["out"], torch.Tensor) else torch.cat([out, h], dim=1)

    def baseline(self, inputs: dict) -> torch.Tensor:
        """The unfused PyTorch pair: the rmsnorm family's PyTorch RMSNorm (after the lookup, gathering),
        then F.linear."""
        if inputs.get("residual") is None:
            x = self._rows(inputs)
            out = F.linear(rmsnorm_torch(x, inputs["norm_w"], inputs["eps"]), inputs["weight"])
            return out if inputs.get("ids") is None else torch.cat([out, x], dim=1)
        y, h = rmsnorm_torch(inputs["x"], inputs["norm_w"], inputs["eps"], residual=inputs["residual"])
        return torch.cat([F.linear(y, inputs["weight"]), h], dim=1)

    def call(self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, weight: torch.Tensor, *,
             config: Config | None = None, **kwargs: Any) -> torch.Tensor:
        return norm_gemv(x, norm_w, eps, weight, config=config, **kwargs)

    def shape_from_call(self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, weight: torch.Tensor, *,
                        residual: torch.Tensor | None = None, ids: torch.Tensor | None = None, **_: Any) -> Shape:
        shape = {"M": x.shape[0] if ids is None else ids.shape[0], "N": weight.shape[0], "K": x.shape[1],
                 "residual": residual is not None}
        return shape if ids is None else {**shape, "gather": True}

    # --- cost model ---------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        M, N, K, residual = _dims(shape)
        # The products and sums, plus per element of x: the square, its sum, the norm weight (and the add).
        return float(2 * M * N * K + M * K * (4 if residual else 3))

    def bytes(self, shape: Shape, dtype: str) -> float:
        M, N, K, residual = _dims(shape)
        elt = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        # W once, x, the norm weight and C (+ residual in, new residual out; or the ids and the
        # gathered rows out).
        if _gather(shape):
            return float((N * K + 2 * M * K + K + M * N) * elt + 8 * M)
        return float((N * K + M * K * (3 if residual else 1) + K + M * N) * elt)

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"M": 1, "N": 40, "K": 96, "residual": True},  # decode; no tile divides N
            {"M": 3, "N": 64, "K": 200, "residual": False},  # padded rows; no K tile divides K
            {"M": 4, "N": 33, "K": 128, "residual": True},
            {"M": 3, "N": 48, "K": 160, "residual": False, "gather": True},  # the embedding lookup fused in
        ]


FAMILY = NormGemvFamily()


def norm_gemv(
    x: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    config: Config | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """C = rmsnorm(x [+ residual]) @ weight^T for M <= 4 rows, one kernel.

    x [M, K], norm_w [K], weight [N, K]; residual [M, K] or None. Returns out [M, N] in x's dtype.
    With a residual, h = x + residual (rounded to x's dtype) is written to ``residual_out`` [M, K],
    which must be given and must not overlap x or residual (every program reads those while the
    first one writes). With ``ids`` [M] (int32 or int64; no residual), x is a table [V, K] (an
    embedding) and the rows are x[ids], written to ``residual_out`` [M, K] as the residual stream:
    a decode step's embedding lookup and first norm in one kernel. Last dims contiguous; rows may
    have any stride. ``config`` None: the family's default config.
    """
    fn = "norm_gemv"
    checks.tensor(fn, "x", x, 2)
    checks.float_dtype(fn, "x", x)
    checks.tensor(fn, "norm_w", norm_w, 1)
    checks.tensor(fn, "weight", weight, 2)
    M, K = x.shape
    if ids is not None:
        checks.tensor(fn, "ids", ids, 1)
        checks.index_dtype(fn, "ids", ids)
        if residual is not None:
            raise ValueError(f"{fn}: ids (an embedding lookup, the first norm) take no residual")
        if residual_out is None:
            raise ValueError(f"{fn}: with ids, residual_out [M, K] must be given for the gathered rows")
        M = ids.shape[0]
        if ids.device.type == "cpu" and M and not 0 <= int(ids.min()) <= int(ids.max()) < x.shape[0]:
            # Cheap on the host; on a GPU it would cost a sync (a wrong id reads outside the table).
            raise ValueError(f"{fn}: ids must index the table's {x.shape[0]} rows, got {ids.tolist()}")
    N = weight.shape[0]
    checks.float_dtype(fn, "norm_w", norm_w, like=x)
    checks.float_dtype(fn, "weight", weight, like=x)
    checks.shape(fn, "norm_w", norm_w, (K,), "[K]")
    checks.shape(fn, "weight", weight, (N, K), "[N, K]")
    check_rows(fn, M)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"{fn}: config must be a dict or None, got {type(config).__name__}")
    tensors = {"x": x, "norm_w": norm_w, "weight": weight}
    if ids is not None:
        tensors["ids"] = ids
    if residual is not None:
        checks.tensor(fn, "residual", residual, 2)
        checks.float_dtype(fn, "residual", residual, like=x)
        checks.shape(fn, "residual", residual, (M, K), "[M, K]")
        if residual_out is None:
            raise ValueError(f"{fn}: with a residual, residual_out [M, K] must be given for the new residual stream")
        tensors["residual"] = residual
    if ids is not None or residual is not None:  # the new residual stream: x + residual, or the gathered rows
        checks.tensor(fn, "residual_out", residual_out, 2)
        checks.float_dtype(fn, "residual_out", residual_out, like=x)
        checks.shape(fn, "residual_out", residual_out, (M, K), "[M, K]")
        storage = residual_out.untyped_storage().data_ptr()
        for name, other in (("x", x), ("residual", residual)):
            if other is not None and M and K and storage == other.untyped_storage().data_ptr():
                raise ValueError(f"{fn}: residual_out shares memory with {name}; other programs still read it")
        tensors["residual_out"] = residual_out
    if out is None:
        out = x.new_empty(M, N)
    checks.tensor(fn, "out", out, 2)
    checks.float_dtype(fn, "out", out, like=x)
    checks.shape(fn, "out", out, (M, N), "[M, N]")
    tensors["out"] = out
    checks.same_device(fn, **tensors)
    for name, t in tensors.items():
        checks.unit_last_stride(fn, name, t)
    if M == 0 or N == 0:
        return out
    shape = FAMILY.shape_from_call(x, norm_w, eps, weight, residual=residual, ids=ids)
    module = FAMILY.resolve(shape, dtype_name(x.dtype), config)[1]
    if ids is not None:
        module.launch(x, ids, residual_out, norm_w, weight, out, eps)
    elif residual is None:
        module.launch(x, norm_w, weight, out, eps)
    else:
        module.launch(x, residual, residual_out, norm_w, weight, out, eps)
    return out
