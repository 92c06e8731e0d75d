"""Naming kernel families so that a worker process can find the same family again.

The tuner accepts a registered family name or a :class:`~kernels.family.Family` instance. Worker
processes are spawned (CUDA forbids fork), so they receive a reference they can import: the
registered name, or ``"module:attribute"`` for an instance defined at module level elsewhere (a
test-only family, a family under development).
"""
from __future__ import annotations

import importlib
import sys

import kernels
from kernels.family import Family


def resolve(family: str | Family) -> Family:
    """The Family object for a registered name, a ``"module:attribute"`` reference or an instance."""
    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        if ":" in family:
            module, _, attr = family.partition(":")
            obj = getattr(importlib.import_module(module), attr, None)
            if not isinstance(obj, Family):
                raise ValueError(f"{family!r} does not name a kernel Family instance")
            return obj
        return kernels.get_family(family)
    raise TypeError(f"family must be a registered name or a kernels.family.Family, got {type(family).__name__}")


def reference(family: str | Family) -> str:
    """A string a spawned process can :func:`resolve` back to the same family."""
    fam = resolve(family)
    if fam.name in kernels.family_names() and kernels.get_family(fam.name) is fam:
        return fam.name
    module_name = type(fam).__module__
    module = sys.modules.get(module_name)
    if module_name != "__main__" and module is not None:
        for attr, value in vars(module).items():
            if value is fam:
                return f"{module_name}:{attr}"
    raise TypeError(
        f"family {fam.name!r} is neither registered in kernels nor a module-level attribute of an importable "
        f"module (its class lives in {module_name!r}); worker processes could not load it"
    )
