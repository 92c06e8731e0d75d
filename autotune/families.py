"""Naming kernel families so that a worker process can find the same family again.

The tuner accepts a registered family name or a :class:`~kernels.family.Family` instance. Worker
processes are fresh interpreters (CUDA forbids fork), so they receive a reference they can resolve:
the registered name; ``"module:attribute"`` for an instance defined at module level elsewhere (a
test-only family, a family under development); or, for an instance held nowhere importable, the
instance pickled (``"pickle:<base64>"``), which needs its class to be importable.
"""
from __future__ import annotations

import base64
import functools
import importlib
import pickle
import sys

import kernels
from kernels.family import Family


def resolve(family: str | Family) -> Family:
    """The Family object for a registered name, a ``"module:attribute"`` reference or an instance."""
    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        if family.startswith("pickle:"):
            return _unpickle(family)
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
    if module_name != "__main__" and "<locals>" not in type(fam).__qualname__:
        return "pickle:" + base64.b64encode(pickle.dumps(fam)).decode()
    raise TypeError(
        f"family {fam.name!r} is not registered in kernels and its class {type(fam).__qualname__!r} cannot be "
        f"imported from module {module_name!r}; define the family in an importable module so that worker "
        f"processes can load it"
    )


@functools.lru_cache(maxsize=16)
def _unpickle(ref: str) -> Family:
    fam = pickle.loads(base64.b64decode(ref.removeprefix("pickle:")))
    if not isinstance(fam, Family):
        raise ValueError("a pickled family reference does not hold a kernel Family")
    return fam
