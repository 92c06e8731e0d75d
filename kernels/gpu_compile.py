"""Compile a family's variants for a CUDA GPU on a machine that has none.

Triton's interpreter accepts code that the GPU compiler rejects (a module global that is not a
``tl.constexpr``, a mask of the wrong rank, an op with no GPU lowering). This runs a variant's
real launch on CPU tensors with every ``@triton.jit`` launch intercepted: the arguments are bound
and specialised exactly as Triton's JIT does, then compiled to a cubin for the target
architecture by Triton's NVIDIA backend (its bundled ptxas), and nothing is launched.

    TRITON_INTERPRET=0 python -m kernels.gpu_compile rmsnorm --shape tokens=7,hidden=2048,residual=true
    TRITON_INTERPRET=0 python -m kernels.gpu_compile rope --shape tokens=4,heads_q=32,heads_kv=8,head_dim=64 --all-configs
    TRITON_INTERPRET=0 python -m kernels.gpu_compile attention_prefill --assume h200 \
        --shape batch=2,seqlen=256,heads_q=4,heads_kv=4,head_dim=128,causal=true --resources

``--assume h200`` (or h100) gives the families that card's facts (kernels.device.assume_device),
so its space, constraints and default apply, Hopper's tensor-descriptor variants included.
``--resources`` prints what ptxas reports per kernel: registers per thread, bytes spilled, and the
shared memory Triton allocated.

It needs ``TRITON_INTERPRET=0`` in the environment before Triton is imported (the package's
default on a CPU-only machine is the interpreter), so tests call it in a subprocess. The launch's
outputs are garbage afterwards (nothing ran); only compilation is checked.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import kernels
from kernels.device import KNOWN_DEVICES, assume_device, interpreting
from kernels.emit import add_variant_arguments, parse_shape
from kernels.family import Config, Family, Shape


@dataclass
class Compiled:
    """One kernel compiled by a launch: its name and Triton's compiled kernel (asm, metadata)."""

    name: str
    kernel: Any


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[Compiled]]:
    """Within the block, ``kernel[grid](...)`` compiles ``kernel`` for sm_``arch`` and launches nothing.

    Yields the list that each compiled kernel is appended to.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if interpreting():
        raise RuntimeError("kernels.gpu_compile needs TRITON_INTERPRET=0 set before triton is imported")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    compiled: list[Compiled] = []

    def run(self: JITFunction, *args, grid, warmup, **kwargs):
        # The JIT's own binding (JITFunction.run), with the target fixed instead of read from a driver.
        kwargs.setdefault("debug", False)
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        source = (GluonASTSource if self.is_gluon() else ASTSource)(self, signature, constexprs, attrs)
        kernel = compile(source, target=target, options=options.__dict__)
        compiled.append(Compiled(self.__name__, kernel))

    saved = JITFunction.run
    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = saved


def compile_launch(fam: Family, shape: Shape, dtype: str, config: Config, arch: int = 90) -> list[Compiled]:
    """Compile every kernel that one launch of ``config`` at ``shape`` runs, in order."""
    inputs = fam.make_inputs(shape, dtype, "cpu", seed=0)
    with compile_only(arch) as compiled:
        fam.run(inputs, config)
    if not compiled:
        raise RuntimeError(f"{fam.name}: no @triton.jit launch happened for {shape} {config}")
    return compiled


def check(fam: Family, shape: Shape, dtype: str, config: Config, arch: int = 90) -> list[str]:
    """Compile every kernel that one launch of ``config`` at ``shape`` runs; their names, in order."""
    return [c.name for c in compile_launch(fam, shape, dtype, config, arch)]


def resources(fam: Family, shape: Shape, dtype: str, config: Config, arch: int = 90) -> list[dict[str, Any]]:
    """Per kernel of one launch: ``name``, ``registers`` per thread and ``spill_bytes`` (stores) as
    ``ptxas -v`` reports them for the kernel's PTX, and ``shared`` bytes as Triton allocated them."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    out = []
    for c in compile_launch(fam, shape, dtype, config, arch):
        ptx = c.kernel.asm["ptx"]
        # ptxas reads the PTX from stdin as /dev/stdin; the cubin it writes is thrown away.
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                               "/dev/stdin", "-o", "/dev/null"], input=ptx, capture_output=True, text=True, check=True)
        regs = re.search(r"Used (\d+) registers", done.stderr)
        spill = re.search(r"(\d+) bytes spill stores", done.stderr)
        if regs is None:
            raise RuntimeError(f"ptxas -v printed no register count for {c.name}: {done.stderr[-500:]}")
        out.append({"name": c.name, "registers": int(regs.group(1)), "spill_bytes": int(spill.group(1)) if spill else 0,
                    "shared": int(c.kernel.metadata.shared)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.gpu_compile", description=__doc__.split("\n")[0])
    add_variant_arguments(parser, "bfloat16")
    parser.add_argument("--all-configs", action="store_true", help="every valid config, not only one")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90: Hopper)")
    parser.add_argument("--assume", choices=sorted(KNOWN_DEVICES), help="the families see this card's facts")
    parser.add_argument("--resources", action="store_true", help="registers, spills and shared memory per kernel")
    args = parser.parse_args(argv)
    fam = kernels.get_family(args.family)
    shape = parse_shape(args.shape)
    with assume_device(KNOWN_DEVICES.get(args.assume)):
        if args.all_configs:
            configs = fam.configs(shape, args.dtype)
        else:
            configs = [json.loads(args.config) if args.config else fam.default_config(shape, args.dtype)]
        for config in configs:
            config = fam.check_config(shape, args.dtype, config)
            if args.resources:
                for r in resources(fam, shape, args.dtype, config, args.arch):
                    print(f"sm_{args.arch} {r['name']}: {r['registers']} registers, {r['spill_bytes']} bytes spilled, "
                          f"{r['shared']} bytes shared {json.dumps(config)}")
            else:
                names = check(fam, shape, args.dtype, config, args.arch)
                print(f"sm_{args.arch} ok: {', '.join(names)} {json.dumps(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
