"""The kernel-family protocol: what the autotuner, the harness and the engine know of a kernel.

A family owns its Triton template, its search space and the constraints that rule a config out
before anything compiles, a heuristic default, input construction, a launcher, a PyTorch reference
in float32/float64 and a cost model. Subclasses fill in the abstract methods; the shared
machinery here (config validation, enumeration of valid configs, emission through the generator,
error measurement) is written once.
"""
from __future__ import annotations

import abc
import functools
import itertools
import math
from types import ModuleType
from typing import Any, Callable

import torch

from kernels import generator

Shape = dict[str, Any]
Config = dict[str, Any]

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name; ``TypeError`` for anything else."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise TypeError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The workbench's name of a torch dtype; ``TypeError`` for unsupported ones."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise TypeError(f"unsupported dtype {dtype}; expected one of {sorted(DTYPES)}")


def tolerance(dtype: str, device: torch.device | str) -> float:
    """Largest accepted ||out - ref|| / ||ref|| for outputs computed in ``dtype``.

    float32 on a GPU goes through TF32 matrix units (10-bit mantissa, ~3e-4 typical); on the CPU
    interpreter it is plain float32. Half types are bounded by the rounding of their outputs
    (2^-11 for float16, 2^-8 for bfloat16) with a margin. A wrong index gives errors of order 1.
    """
    on_gpu = torch.device(device).type == "cuda"
    return {"float32": 2e-3 if on_gpu else 1e-5, "float16": 3e-3, "bfloat16": 2e-2}[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on ``ref``'s device; ``inf`` when ``out`` holds a NaN or an infinity."""
    ref64 = ref.detach().double()
    out64 = out.detach().to(device=ref64.device, dtype=torch.float64)
    if out64.shape != ref64.shape:
        raise ValueError(f"output shape {tuple(out64.shape)} differs from reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def positive_dims(family: str, shape: Shape, keys: tuple[str, ...]) -> tuple[int, ...]:
    """The integer values of ``keys`` in ``shape``; ``ValueError`` naming a missing or non-positive one."""
    missing = [k for k in keys if k not in shape]
    if missing:
        raise ValueError(f"{family} shape needs keys {list(keys)}; {', '.join(map(repr, missing))} is missing from {shape}")
    dims = tuple(int(shape[k]) for k in keys)
    if min(dims) < 1:
        raise ValueError(f"{family} shape dimensions must be positive, got {shape}")
    return dims


def occupancy_reject(tile: int, num_warps: int, max_per_thread: int, what: str) -> str | None:
    """Why a program of ``num_warps`` warps cannot hold a ``tile``-element tile well, or None.

    More than ``max_per_thread`` values a thread spill registers; fewer values than threads leave
    threads idle. ``what`` names the tile in the reason (e.g. "a 4x2048 tile").
    """
    threads = 32 * num_warps
    if tile > max_per_thread * threads:
        return f"{what} is {tile // threads} values per thread with {num_warps} warps"
    if tile < threads:
        return f"{num_warps} warps for {what} leave threads idle"
    return None


def config_steps(config: Config, center: Config) -> list[float]:
    """Per key of ``center``, in its order, how far ``config`` is from it: powers of two between
    positive numbers, 1 for any other difference (a category, or 0 meaning "unset")."""
    return [
        abs(math.log2(config[k]) - math.log2(v)) if isinstance(v, int) and not isinstance(v, bool) and v > 0 < config[k]
        else float(config[k] != v)
        for k, v in center.items()
    ]


def is_pow2(n: int) -> bool:
    """Whether n is a positive power of two."""
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


class Family(abc.ABC):
    """One kind of kernel. See INTERFACE.md for the protocol; subclasses implement the abstract parts.

    ``template_version`` is part of every emitted module's hash: bump it when the template changes
    so that caches keyed on it (on-disk modules, tuned configs) stop matching.
    """

    name: str
    template_file: str  # the Jinja template, under kernels/templates/
    template_version: int = 1

    @functools.cached_property
    def template(self) -> str:
        """All of the family's Jinja source: what its template hash covers (kernels/generator.py)."""
        return generator.template_text(self.template_file)

    def template_file_for(self, facts: dict[str, Any]) -> str:
        """The template (under kernels/templates/) that renders the variant of ``facts``: the
        family's one template, unless a family keeps a variant in a template of its own."""
        return self.template_file

    # --- search space -----------------------------------------------------------------------
    @abc.abstractmethod
    def space(self, shape: Shape, dtype: str) -> dict[str, list]:
        """Tunable parameters of ``shape``/``dtype`` and their candidate values."""

    @abc.abstractmethod
    def reject(self, shape: Shape, dtype: str, config: Config) -> str | None:
        """Why ``config`` cannot run ``shape`` (a short reason), or None when it is valid.

        Called on configs whose keys and values already come from :meth:`space`.
        """

    @abc.abstractmethod
    def default_config(self, shape: Shape, dtype: str) -> Config:
        """A config chosen by a cheap heuristic; always valid."""

    def configs(self, shape: Shape, dtype: str) -> list[Config]:
        """Every valid config: the product of :meth:`space`, filtered by :meth:`reject`."""
        space = self.space(shape, dtype)
        keys = list(space)
        out = []
        for values in itertools.product(*(space[k] for k in keys)):
            cfg = dict(zip(keys, values))
            if self.reject(shape, dtype, cfg) is None:
                out.append(cfg)
        return out

    def check_config(self, shape: Shape, dtype: str, config: Config) -> Config:
        """``config`` if valid, else ``ValueError``/``TypeError`` naming the offending key or value."""
        if not isinstance(config, dict):
            raise TypeError(f"{self.name}: config must be a dict, got {type(config).__name__}")
        space = self.space(shape, dtype)
        unknown = sorted(set(config) - set(space))
        if unknown:
            raise ValueError(f"{self.name}: unknown config key(s) {unknown}; known keys are {sorted(space)}")
        missing = sorted(set(space) - set(config))
        if missing:
            raise ValueError(f"{self.name}: config lacks key(s) {missing}")
        for key, value in config.items():
            if value not in space[key]:
                raise ValueError(
                    f"{self.name}: config {key}={value!r} is not a candidate for this shape; "
                    f"candidates are {space[key]}"
                )
        why = self.reject(shape, dtype, config)
        if why is not None:
            raise ValueError(f"{self.name}: config {config} is invalid for shape {shape}: {why}")
        return config

    # --- source -----------------------------------------------------------------------------
    @abc.abstractmethod
    def facts(self, shape: Shape, dtype: str, config: Config) -> dict[str, Any]:
        """Everything the template is rendered with: shape facts, dtype facts and the config.

        Only facts that change the emitted text belong here, so that shapes sharing them share
        one compiled module (the engine runs many M for one GEMM weight).
        """

    def emit(self, shape: Shape, dtype: str, config: Config) -> str:
        """Standalone Triton source of the variant for ``shape``, ``dtype`` and ``config``."""
        self.check_config(shape, dtype, config)
        return generator.render(self, self.facts(shape, dtype, config))

    def module(self, shape: Shape, dtype: str, config: Config):
        """The compiled (imported) module of that variant, cached on disk and in memory."""
        return generator.load(self, self.facts(shape, dtype, config))

    @functools.cached_property
    def _resolved(self) -> dict[tuple, tuple[Config, ModuleType]]:
        return {}

    def resolve(self, shape: Shape, dtype: str, config: Config | None) -> tuple[Config, ModuleType]:
        """(config, emitted module) of a launch; ``config`` None means the default config.

        Validated and loaded once per (shape, dtype, config), then answered from a memo: this is on
        every direct call's path. Callers pass the shape facts that select a variant (a GEMM's M, not
        an elementwise op's token count), so the memo holds a few entries per operator.
        """
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"{self.name}: config must be a dict or None, got {type(config).__name__}")
        try:
            key = (tuple(sorted(shape.items())), dtype, None if config is None else tuple(sorted(config.items())))
            hit = self._resolved.get(key)
        except TypeError:  # an unhashable value is no candidate: check_config below names it
            key, hit = None, None
        if hit is None:
            cfg = self.default_config(shape, dtype) if config is None else dict(config)
            self.check_config(shape, dtype, cfg)
            hit = (cfg, self.module(shape, dtype, cfg))
            if key is not None:
                self._resolved[key] = hit
        return hit

    # --- running ------------------------------------------------------------------------------
    @abc.abstractmethod
    def make_inputs(self, shape: Shape, dtype: str, device: str | torch.device, seed: int = 0) -> dict:
        """Random inputs for one launch, plus an ``out`` buffer the launch writes into."""

    @abc.abstractmethod
    def shape_of(self, inputs: dict) -> Shape:
        """The shape dict that ``inputs`` were made for."""

    @abc.abstractmethod
    def run(self, inputs: dict, config: Config | None) -> torch.Tensor:
        """Launch on ``inputs`` (writing ``inputs['out']``) and return the output."""

    def timed_call(self, inputs: dict, config: Config | None) -> Callable[[], Any]:
        """A zero-argument callable that launches only the kernel on ``inputs``: what timing measures.

        ``run`` by default. In-place families override it: their ``run`` first copies the inputs into
        the output buffers (so that poisoning detects unwritten elements), which timing must not count.
        """
        return lambda: self.run(inputs, config)

    @abc.abstractmethod
    def reference(self, inputs: dict) -> torch.Tensor:
        """The same result computed by plain PyTorch in float32 or float64."""

    # --- cost model ---------------------------------------------------------------------------
    @abc.abstractmethod
    def flops(self, shape: Shape) -> float:
        """Floating-point operations of one launch."""

    @abc.abstractmethod
    def bytes(self, shape: Shape, dtype: str) -> float:
        """The fewest bytes one launch must move through device memory."""

    @abc.abstractmethod
    def tiny_shapes(self) -> list[Shape]:
        """A few small shapes (odd sizes included) that run in seconds under the interpreter."""

    # --- direct calls (what tuned dispatch wraps) ----------------------------------------------
    def call(self, *args: Any, config: Config | None = None, **kwargs: Any) -> Any:
        """The family's direct-call function (e.g. ``kernels.gemm.matmul``) with ``config``."""
        raise NotImplementedError(f"{self.name} has no direct call")

    def shape_from_call(self, *args: Any, **kwargs: Any) -> Shape:
        """The shape dict of a direct call's arguments (what the config cache is keyed on)."""
        raise NotImplementedError(f"{self.name} has no direct call")

    def bucket(self, shape: Shape) -> Shape:
        """The shape a tuned config is looked up for. Families whose shapes vary every step
        (a context length) round them here so that dispatch memoises a few buckets, not every length."""
        return shape

    def baseline(self, inputs: dict) -> torch.Tensor | None:
        """The vendor baseline on the same inputs (cuBLAS, SDPA), or None when there is none."""
        return None

    def tolerance(self, dtype: str, device: torch.device | str) -> float:
        """Accepted relative error of this family's output (see :func:`tolerance`)."""
        return tolerance(dtype, device)

    def __repr__(self) -> str:
        return f"<kernel family {self.name!r}>"
