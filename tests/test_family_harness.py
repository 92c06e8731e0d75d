"""The correctness harness: every registered family, its tiny shapes, every dtype the backend
computes correctly, the default config and configs sampled from ``configs()``.

Each run gets fresh random inputs and an output poisoned with NaN first, so an element the kernel
never writes fails; the error ||out - ref|| / ||ref|| against the float32/float64 reference must
be under the family's per-dtype tolerance, which a wrong index exceeds by orders of magnitude.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

import kernels
from kernels.family import rel_error
from kernels.lint import jit_global_errors

SAMPLED_CONFIGS = 4  # configs drawn from configs() per (family, shape, dtype), besides the default


def _poison(inputs: dict) -> None:
    out = inputs["out"]
    outs = out if isinstance(out, (list, tuple)) else [out]
    for t in outs:
        t.fill_(float("nan"))


def _sampled(fam, shape, dtype, seed: int) -> list[dict]:
    """The default config, then configs spread over structural variants, drawn at random."""
    cfgs = fam.configs(shape, dtype)
    assert cfgs, f"{fam.name}: no valid config for {shape} {dtype}"
    rng = random.Random(seed)
    by_variant: dict[str, list[dict]] = {}
    for c in cfgs:
        by_variant.setdefault(str(c.get("variant", "")), []).append(c)
    picked = [rng.choice(group) for group in by_variant.values()]
    rng.shuffle(picked)
    rest = rng.sample(cfgs, min(len(cfgs), SAMPLED_CONFIGS))
    return [fam.default_config(shape, dtype)] + (picked + rest)[: max(SAMPLED_CONFIGS, len(picked))]


def _cases():
    for name in kernels.family_names():
        fam = kernels.get_family(name)
        for i, shape in enumerate(fam.tiny_shapes()):
            yield pytest.param(name, shape, id=f"{name}-{i}")


@pytest.mark.parametrize("name,shape", list(_cases()))
def test_family_matches_reference(name: str, shape: dict, dtype: str, device: torch.device) -> None:
    fam = kernels.get_family(name)
    tol = fam.tolerance(dtype, device)
    for k, config in enumerate(_sampled(fam, shape, dtype, seed=zlib.crc32(f"{name}{shape}{dtype}".encode()))):
        inputs = fam.make_inputs(shape, dtype, device, seed=k + 1)
        ref = fam.reference(inputs)
        _poison(inputs)
        out = fam.run(inputs, config)
        err = rel_error(out, ref)
        assert err <= tol, f"{name} {shape} {dtype} config {config}: rel error {err:.3g} > {tol:.1g}"


@pytest.mark.parametrize("name", kernels.family_names())
def test_family_protocol(name: str) -> None:
    fam = kernels.get_family(name)
    assert fam.name == name
    for shape in fam.tiny_shapes():
        for dtype in ("float16", "float32"):
            space = fam.space(shape, dtype)
            assert space and all(isinstance(v, list) and v for v in space.values())
            default = fam.default_config(shape, dtype)
            for cfg in [default] + fam.configs(shape, dtype)[:: max(1, len(fam.configs(shape, dtype)) // 8)]:
                assert jit_global_errors(fam.emit(shape, dtype, cfg)) == [], f"{cfg}: non-constexpr globals"
            assert fam.check_config(shape, dtype, default) == default
            src = fam.emit(shape, dtype, default)
            compile(src, f"<{name}>", "exec")  # standalone, valid Python
            assert "{{" not in src and "{%" not in src
            assert jit_global_errors(src) == [], "the GPU compiler rejects these (the interpreter does not)"
            assert fam.flops(shape) >= 0 and fam.bytes(shape, dtype) > 0  # a copy (kv_store) does no arithmetic


@pytest.mark.parametrize("name", kernels.family_names())
def test_bad_config_is_rejected_by_name(name: str) -> None:
    fam = kernels.get_family(name)
    shape = fam.tiny_shapes()[0]
    default = fam.default_config(shape, "float32")
    with pytest.raises(ValueError, match="no_such_key"):
        fam.emit(shape, "float32", {**default, "no_such_key": 1})
    key = next(iter(default))
    with pytest.raises(ValueError, match=key):
        fam.emit(shape, "float32", {**default, key: object()})
    with pytest.raises(TypeError):
        fam.emit(shape, "float32", [1, 2])


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="no_such_family"):
        kernels.get_family("no_such_family")
