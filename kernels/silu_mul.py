"""The SiLU-and-multiply family: the SwiGLU activation of a Llama MLP.

    out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i],   silu(g) = g * sigmoid(g)

on the output of the fused gate/up projection (one GEMM against the concatenated weights), so
the activation reads gate and up once and writes the product once: 3 * T * I elements moved,
against 6 for separate silu and multiply kernels. Computed in float32, rounded once.

Shape dicts are ``{"tokens", "intermediate"}``; the template is ``kernels/templates/silu_mul.py.j2``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels import checks
from kernels.family import Config, Family, Shape, dtype_name, next_pow2, occupancy_reject, positive_dims, tolerance, torch_dtype

MAX_ELEMENTS_PER_THREAD = 32  # output values per thread (each with a gate and an up value in float32)


def _dims(shape: Shape) -> tuple[int, int]:
    return positive_dims("silu_mul", shape, ("tokens", "intermediate"))


class SiluMulFamily(Family):
    name = "silu_mul"
    template_file = "silu_mul.py.j2"
    template_version = 1

    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        # Nothing here depends on `tokens`: a config tuned for one token count is valid for all.
        _, I = _dims(shape)
        torch_dtype(dtype)
        return {
            "BLOCK_I": [b for b in (64, 128, 256, 512, 1024, 2048, 4096) if b <= max(64, next_pow2(I))],
            "ROWS": [1, 2, 4, 8],
            "num_warps": [1, 2, 4, 8],
        }

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        tile = config["ROWS"] * config["BLOCK_I"]
        return occupancy_reject(tile, config["num_warps"], MAX_ELEMENTS_PER_THREAD,
                                f"a {config['ROWS']}x{config['BLOCK_I']} tile")

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """1024-column tiles of one row, 8 outputs per thread (16-byte loads in half precision)."""
        _, I = _dims(shape)
        block = min(1024, max(64, next_pow2(I)))
        return {"BLOCK_I": block, "ROWS": 1, "num_warps": max(1, block // 256)}

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        _, I = _dims(shape)
        return {
            "INTER": I,
            "BLOCK_I": config["BLOCK_I"],
            "ROWS": config["ROWS"],
            "EVEN_I": I % config["BLOCK_I"] == 0,
            "NUM_WARPS": config["num_warps"],
        }

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        T, I = _dims(shape)
        dt = torch_dtype(dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return {
            "gate_up": (2.0 * torch.randn(T, 2 * I, generator=gen)).to(device=device, dtype=dt),
            "out": torch.empty(T, I, device=device, dtype=dt),
        }

    def shape_of(self, inputs: dict) -> Shape:
        T, two_i = inputs["gate_up"].shape
        return {"tokens": T, "intermediate": two_i // 2}

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        return silu_mul(inputs["gate_up"], config=config, out=inputs["out"])

    def reference(self, inputs: dict) -> torch.Tensor:
        gate, up = inputs["gate_up"].double().chunk(2, dim=-1)
        return gate * torch.sigmoid(gate) * up

    def baseline(self, inputs: dict) -> torch.Tensor:
        return silu_mul_torch(inputs["gate_up"])

    def call(self, gate_up: torch.Tensor, *, config: Config | None = None, **kwargs: Any) -> torch.Tensor:
        return silu_mul(gate_up, config=config, **kwargs)

    def shape_from_call(self, gate_up: torch.Tensor, **_: Any) -> Shape:
        return self.shape_of({"gate_up": gate_up})

    def tolerance(self, dtype: str, device: torch.device | str) -> float:
        # No matrix units here: float32 stays float32 on a GPU too (no TF32 allowance).
        return 1e-5 if dtype == "float32" else tolerance(dtype, device)

    # --- cost model ---------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        T, I = _dims(shape)
        return float(T * I * 5)  # exp, add, divide (the sigmoid), two multiplies

    def bytes(self, shape: Shape, dtype: str) -> float:
        T, I = _dims(shape)
        return float(3 * T * I * torch.empty((), dtype=torch_dtype(dtype)).element_size())

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"tokens": 5, "intermediate": 40},  # narrower than the smallest tile
            {"tokens": 1, "intermediate": 128},  # decode: one token
            {"tokens": 9, "intermediate": 300},  # ragged tiles in both dims
        ]


FAMILY = SiluMulFamily()


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch equivalent (as Hugging Face's LlamaMLP): silu(gate) * up in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor, *, config: Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] = [gate | up]; returns out [T, I] in gate_up's dtype.

    Last dims must be contiguous; rows may have any stride. ``out`` [T, I] is written when given.
    ``config`` None uses the family's default config.
    """
    fn = "silu_mul"
    checks.tensor(fn, "gate_up", gate_up, 2)
    checks.float_dtype(fn, "gate_up", gate_up)
    T, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"{fn}: gate_up's last dim must be even (gate then up halves), got {two_i}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"{fn}: config must be a dict or None, got {type(config).__name__}")
    I = two_i // 2
    if out is None:
        out = gate_up.new_empty(T, I)
    checks.tensor(fn, "out", out, 2)
    checks.float_dtype(fn, "out", out, like=gate_up)
    checks.shape(fn, "out", out, (T, I), "[T, I]")
    checks.same_device(fn, gate_up=gate_up, out=out)
    for name, t in (("gate_up", gate_up), ("out", out)):
        checks.unit_last_stride(fn, name, t)
    if T > 0 and I > 0:
        shape = {"tokens": 1, "intermediate": I}  # any token count: one memo entry
        FAMILY.resolve(shape, dtype_name(gate_up.dtype), config)[1].launch(gate_up, out)
    return out
