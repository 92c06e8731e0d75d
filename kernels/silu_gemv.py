"""The silu_gemv family: a Llama MLP's SwiGLU activation and down projection, for decode rows.

    C = (silu(gate) * up) @ W^T,   gate_up = [gate | up] [M, 2K],   W [N, K]

for M <= 4 rows (batch-1 to batch-4 decode), in one kernel instead of a silu_mul kernel and a
GEMV: each K step loads the gate and up columns it needs and forms the activation in registers
(see ``kernels/templates/gemv_prologue.py.j2``). At decode sizes the activation kernel is bound by its
launch, not its bytes, so the saving is a launch per layer; the GEMV's own traffic (W) is unchanged.

Shape dicts are ``{"M", "N", "K"}`` (K the intermediate size). Space, constraints and default:
``kernels/gemv_prologue.py``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels import checks
from kernels.family import Config, Shape, dtype_name, torch_dtype
from kernels.gemv_prologue import GemvPrologueFamily, check_rows, gemv_dims
from kernels.silu_mul import silu_mul_torch


class SiluGemvFamily(GemvPrologueFamily):
    name = "silu_gemv"
    prologue = "silu_mul"
    template_version = 1
    # The winner tuned at down, 2048x8192: 13.2 us on an H200 (see GemvPrologueFamily.default_config).
    default_tile = {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3}

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        return self.tile_facts(shape, config)

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        M, N, K = gemv_dims(self.name, shape)
        dt = torch_dtype(dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return {
            "gate_up": (2.0 * torch.randn(M, 2 * K, generator=gen)).to(device=device, dtype=dt),
            "weight": (torch.randn(N, K, generator=gen) / K**0.5).to(device=device, dtype=dt),
            "out": torch.empty(M, N, device=device, dtype=dt),
        }

    def shape_of(self, inputs: dict) -> Shape:
        M, N, K = inputs["gate_up"].shape[0], inputs["weight"].shape[0], inputs["weight"].shape[1]
        return {"M": M, "N": N, "K": K}

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        return silu_gemv(inputs["gate_up"], inputs["weight"], config=config, out=inputs["out"])

    def reference(self, inputs: dict) -> torch.Tensor:
        gate, up = inputs["gate_up"].double().chunk(2, dim=-1)
        return (gate * torch.sigmoid(gate) * up) @ inputs["weight"].double().t()

    def baseline(self, inputs: dict) -> torch.Tensor:
        """The unfused PyTorch pair, as Hugging Face's LlamaMLP: silu(gate) * up, then F.linear."""
        return F.linear(silu_mul_torch(inputs["gate_up"]), inputs["weight"])

    def call(self, gate_up: torch.Tensor, weight: torch.Tensor, *, config: Config | None = None, **kwargs: Any):
        return silu_gemv(gate_up, weight, config=config, **kwargs)

    def shape_from_call(self, gate_up: torch.Tensor, weight: torch.Tensor, **_: Any) -> Shape:
        return {"M": gate_up.shape[0], "N": weight.shape[0], "K": weight.shape[1]}

    # --- cost model ---------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        M, N, K = gemv_dims(self.name, shape)
        return float(2 * M * N * K + 5 * M * K)  # the products and sums; the activation (as silu_mul)

    def bytes(self, shape: Shape, dtype: str) -> float:
        M, N, K = gemv_dims(self.name, shape)
        elt = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        return float((N * K + 2 * M * K + M * N) * elt)  # W once, gate and up, C

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"M": 1, "N": 40, "K": 96},  # decode; no tile divides N
            {"M": 3, "N": 64, "K": 200},  # padded rows; no K tile divides K
            {"M": 4, "N": 33, "K": 128},
        ]


FAMILY = SiluGemvFamily()


def silu_gemv(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    *,
    config: Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """C = (silu(gate) * up) @ weight^T for gate_up [M, 2K] = [gate | up] (M <= 4) and weight [N, K].

    Returns out [M, N] in gate_up's dtype (written when given). Last dims contiguous; rows may have
    any stride. ``config`` None: the family's default config.
    """
    fn = "silu_gemv"
    checks.tensor(fn, "gate_up", gate_up, 2)
    checks.float_dtype(fn, "gate_up", gate_up)
    checks.tensor(fn, "weight", weight, 2)
    checks.float_dtype(fn, "weight", weight, like=gate_up)
    M, two_k = gate_up.shape
    N, K = weight.shape
    if two_k != 2 * K:
        raise ValueError(f"{fn}: gate_up must be [M, 2K] = [gate | up] for weight [N, K={K}], got {tuple(gate_up.shape)}")
    check_rows(fn, M)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"{fn}: config must be a dict or None, got {type(config).__name__}")
    if out is None:
        out = gate_up.new_empty(M, N)
    checks.tensor(fn, "out", out, 2)
    checks.float_dtype(fn, "out", out, like=gate_up)
    checks.shape(fn, "out", out, (M, N), "[M, N]")
    checks.same_device(fn, gate_up=gate_up, weight=weight, out=out)
    for name, t in (("gate_up", gate_up), ("weight", weight), ("out", out)):
        checks.unit_last_stride(fn, name, t)
    if M and N and K:
        FAMILY.resolve({"M": M, "N": N, "K": K}, dtype_name(gate_up.dtype), config)[1].launch(gate_up, weight, out)
    elif M and N:
        out.zero_()
    return out
