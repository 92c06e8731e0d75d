"""Compile a family's variants for a CUDA GPU on a machine that has none.

Triton's interpreter accepts code that the GPU compiler rejects (a module global that is not a
``tl.constexpr``, a mask of the wrong rank, an op with no GPU lowering). This runs a variant's
real launch on CPU tensors with every ``@triton.jit`` launch intercepted: the arguments are bound
and specialised exactly as Triton's JIT does, then compiled to a cubin for the target
architecture by Triton's NVIDIA backend (its bundled ptxas), and nothing is launched.

    TRITON_INTERPRET=0 python -m kernels.gpu_compile rmsnorm --shape tokens=7,hidden=2048,residual=true
    TRITON_INTERPRET=0 python -m kernels.gpu_compile rope --shape tokens=4,heads_q=32,heads_kv=8,head_dim=64 --all-configs

It needs ``TRITON_INTERPRET=0`` in the environment before Triton is imported (the package's
default on a CPU-only machine is the interpreter), so tests call it in a subprocess. The launch's
outputs are garbage afterwards (nothing ran); only compilation is checked. Kernel arguments that
are not tensors, ints, floats or constexprs (tensor descriptors) are not supported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Iterator

import kernels
from kernels.device import interpreting
from kernels.emit import add_variant_arguments, parse_shape
from kernels.family import Config, Family, Shape


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[str]]:
    """Within the block, ``kernel[grid](...)`` compiles ``kernel`` for sm_``arch`` and launches nothing.

    Yields the list that the names of compiled kernels are appended to.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if interpreting():
        raise RuntimeError("kernels.gpu_compile needs TRITON_INTERPRET=0 set before triton is imported")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    compiled: list[str] = []

    def run(self: JITFunction, *args, grid, warmup, **kwargs):
        # The JIT's own binding (JITFunction.run), with the target fixed instead of read from a driver.
        kwargs.setdefault("debug", False)
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        compiled.append(self.__name__)

    saved = JITFunction.run
    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = saved


def check(fam: Family, shape: Shape, dtype: str, config: Config, arch: int = 90) -> list[str]:
    """Compile every kernel that one launch of ``config`` at ``shape`` runs; their names, in order."""
    inputs = fam.make_inputs(shape, dtype, "cpu", seed=0)
    with compile_only(arch) as compiled:
        fam.run(inputs, config)
    if not compiled:
        raise RuntimeError(f"{fam.name}: no @triton.jit launch happened for {shape} {config}")
    return compiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.gpu_compile", description=__doc__.split("\n")[0])
    add_variant_arguments(parser, "bfloat16")
    parser.add_argument("--all-configs", action="store_true", help="every valid config, not only one")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90: Hopper)")
    args = parser.parse_args(argv)
    fam = kernels.get_family(args.family)
    shape = parse_shape(args.shape)
    if args.all_configs:
        configs = fam.configs(shape, args.dtype)
    else:
        configs = [json.loads(args.config) if args.config else fam.default_config(shape, args.dtype)]
    for config in configs:
        names = check(fam, shape, args.dtype, fam.check_config(shape, args.dtype, config), args.arch)
        print(f"sm_{args.arch} ok: {', '.join(names)} {json.dumps(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
