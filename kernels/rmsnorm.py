"""The RMSNorm family, with the residual add of a pre-norm transformer block fused in.

    h = x + residual            (only when a residual is given; h is the new residual stream)
    out = h * rsqrt(mean(h^2) + eps) * weight

computed in float32 and rounded once to x's dtype. Fusing the add saves a full read and write of
the activations per norm: the residual stream is read once and written once.

Structural variants (the categorical parameter ``variant``): ``row`` keeps a whole row in
registers (one read, one write per element); ``chunked`` walks the row twice in BLOCK_H chunks,
for hidden sizes too wide for one register tile. Shape dicts are ``{"tokens", "hidden",
"residual"}``. The template is ``kernels/templates/rmsnorm.py.j2``.
"""
from __future__ import annotations

from typing import Any

import torch

from kernels import checks
from kernels.device import programmatic_launch
from kernels.family import Config, Family, Shape, dtype_name, next_pow2, occupancy_reject, positive_dims, tolerance, torch_dtype

VARIANTS = ("row", "chunked")
CHUNKS = (64, 128, 256, 512, 1024, 2048, 4096)  # chunked variant: columns per chunk
MAX_ELEMENTS_PER_THREAD = 64  # float32 values of the row tile one thread may hold before spilling
EPS = 1e-5  # make_inputs' epsilon (Llama 3 uses 1e-5)


def _dims(shape: Shape) -> tuple[int, int, bool]:
    T, H = positive_dims("rmsnorm", shape, ("tokens", "hidden"))
    return T, H, bool(shape.get("residual", False))


class RMSNormFamily(Family):
    name = "rmsnorm"
    template_file = "rmsnorm.py.j2"
    template_version = 1

    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        # Nothing here depends on `tokens`: a config tuned for one token count is valid for all.
        _, H, _ = _dims(shape)
        torch_dtype(dtype)
        full = next_pow2(H)
        return {
            "variant": list(VARIANTS),
            "BLOCK_H": sorted({full, *(c for c in CHUNKS if c < full)}),
            "ROWS": [1, 2, 4, 8, 16],
            "num_warps": [1, 2, 4, 8, 16],
        }

    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        _, H, _ = _dims(shape)
        full = next_pow2(H)
        if config["variant"] == "row" and config["BLOCK_H"] != full:
            return f"the row variant holds the whole row: BLOCK_H must be {full}"
        if config["variant"] == "chunked" and config["BLOCK_H"] >= full:
            return f"the chunked variant needs BLOCK_H below the padded row {full}"
        tile = config["ROWS"] * config["BLOCK_H"]
        return occupancy_reject(tile, config["num_warps"], MAX_ELEMENTS_PER_THREAD,
                                f"a {config['ROWS']}x{config['BLOCK_H']} tile")

    def default_config(self, shape: Shape, dtype: str) -> Config:
        """A whole row in registers with 16 values per thread, several rows when rows are short."""
        _, H, _ = _dims(shape)
        full = next_pow2(H)
        if full <= 8192:
            cfg = {"variant": "row", "BLOCK_H": full, "ROWS": min(16, max(1, 2048 // full))}
        else:
            cfg = {"variant": "chunked", "BLOCK_H": 2048, "ROWS": 1}
        cfg["num_warps"] = min(16, max(1, cfg["ROWS"] * cfg["BLOCK_H"] // 512))
        return cfg

    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        _, H, residual = _dims(shape)
        return {
            "VARIANT": config["variant"],
            "HIDDEN": H,
            "BLOCK_H": config["BLOCK_H"],
            "ROWS": config["ROWS"],
            "RESIDUAL": residual,
            "EVEN_H": H % config["BLOCK_H"] == 0,
            "NUM_WARPS": config["num_warps"],
            "PDL": programmatic_launch(),
        }

    # --- running ------------------------------------------------------------------------------
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        """x, weight (and residual) random; ``out`` is [T, H], or [2, T, H] holding (out, new residual)."""
        T, H, residual = _dims(shape)
        dt = torch_dtype(dtype)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        inputs = {
            "x": torch.randn(T, H, generator=gen).to(device=device, dtype=dt),
            "weight": (1.0 + 0.5 * torch.randn(H, generator=gen)).to(device=device, dtype=dt),
            "eps": EPS,
        }
        if residual:
            inputs["residual"] = torch.randn(T, H, generator=gen).to(device=device, dtype=dt)
            inputs["out"] = torch.empty(2, T, H, device=device, dtype=dt)
        else:
            inputs["out"] = torch.empty(T, H, device=device, dtype=dt)
        return inputs

    def shape_of(self, inputs: dict) -> Shape:
        T, H = inputs["x"].shape
        return {"tokens": T, "hidden": H, "residual": inputs.get("residual") is not None}

    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        out = inputs["out"]
        if inputs.get("residual") is None:
            return rmsnorm(inputs["x"], inputs["weight"], inputs["eps"], config=config, out=out)
        rmsnorm(inputs["x"], inputs["weight"], inputs["eps"], residual=inputs["residual"], config=config,
                out=out[0], residual_out=out[1])
        return out

    def reference(self, inputs: dict) -> torch.Tensor:
        h = inputs["x"].double()
        if inputs.get("residual") is not None:
            h = h + inputs["residual"].double()
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + inputs["eps"]) * inputs["weight"].double()
        return y if inputs.get("residual") is None else torch.stack([y, h])

    def baseline(self, inputs: dict) -> torch.Tensor:
        res = rmsnorm_torch(inputs["x"], inputs["weight"], inputs["eps"], residual=inputs.get("residual"))
        return res if inputs.get("residual") is None else torch.stack(res)

    def call(self, x: torch.Tensor, weight: torch.Tensor, eps: float, *, config: Config | None = None, **kwargs: Any):
        return rmsnorm(x, weight, eps, config=config, **kwargs)

    def shape_from_call(self, x: torch.Tensor, weight: torch.Tensor, eps: float = EPS, *,
                        residual: torch.Tensor | None = None, **_: Any) -> Shape:
        return {"tokens": x.shape[0], "hidden": x.shape[1], "residual": residual is not None}

    def tolerance(self, dtype: str, device: torch.device | str) -> float:
        # No matrix units here: float32 stays float32 on a GPU too (no TF32 allowance).
        return 1e-5 if dtype == "float32" else tolerance(dtype, device)

    # --- cost model ---------------------------------------------------------------------------
    def flops(self, shape: Shape) -> float:
        T, H, residual = _dims(shape)
        # square, accumulate, scale by 1/rms, scale by weight (+ the residual add).
        return float(T * H * (5 if residual else 4))

    def bytes(self, shape: Shape, dtype: str) -> float:
        T, H, residual = _dims(shape)
        elt = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        # x in, out out (+ residual in, new residual out), the weight once.
        return float((T * H * (4 if residual else 2) + H) * elt)

    def tiny_shapes(self) -> list[Shape]:
        return [
            {"tokens": 5, "hidden": 24, "residual": False},  # row narrower than a power of two
            {"tokens": 7, "hidden": 300, "residual": True},  # chunked variant possible, ragged chunks
            {"tokens": 1, "hidden": 64, "residual": True},  # decode: one token
            {"tokens": 19, "hidden": 128, "residual": False},  # several programs of several rows
        ]


FAMILY = RMSNormFamily()


def rmsnorm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch equivalent (as Hugging Face's LlamaRMSNorm, with the add in x's dtype)."""
    h = x if residual is None else x + residual
    h32 = h.float()
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    config: Config | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] scaled by weight [H]; with ``residual`` [T, H], the add fused in first.

    Returns out [T, H] in x's dtype, or (out, new_residual) when ``residual`` is given, where
    new_residual = x + residual. ``out`` and ``residual_out`` are written when given and may alias
    ``x`` and ``residual`` (in place, as a serving engine does). All [T, H] tensors need a contiguous
    last dim; rows may have any stride. ``config`` None uses the family's default config.
    """
    fn = "rmsnorm"
    checks.tensor(fn, "x", x, 2)
    checks.tensor(fn, "weight", weight, 1)
    checks.float_dtype(fn, "x", x)
    checks.float_dtype(fn, "weight", weight, like=x)
    T, H = x.shape
    checks.shape(fn, "weight", weight, (H,), "[H]")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{fn}: eps must be a non-negative number, got {eps!r}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"{fn}: config must be a dict or None, got {type(config).__name__}")
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        tensors["residual"] = checks.tensor(fn, "residual", residual, 2)
        if residual_out is None:
            residual_out = torch.empty_like(x)
        tensors["residual_out"] = checks.tensor(fn, "residual_out", residual_out, 2)
    elif residual_out is not None:
        raise ValueError(f"{fn}: residual_out is given but residual is not")
    if out is None:
        out = torch.empty_like(x)
    tensors["out"] = checks.tensor(fn, "out", out, 2)
    for name, t in tensors.items():
        if name != "weight":
            checks.float_dtype(fn, name, t, like=x)
            checks.shape(fn, name, t, (T, H), "[T, H]")
        checks.unit_last_stride(fn, name, t)
    checks.same_device(fn, **tensors)
    if T > 0:
        # The token count is no shape fact of the variant: one memo entry serves every T.
        shape = {"tokens": 1, "hidden": H, "residual": residual is not None}
        launch = FAMILY.resolve(shape, dtype_name(x.dtype), config)[1].launch
        if residual is None:
            launch(x, weight, out, float(eps))
        else:
            launch(x, residual, residual_out, weight, out, float(eps))
    return out if residual is None else (out, residual_out)
