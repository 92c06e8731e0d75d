"""Static checks of emitted Triton source that the CPU interpreter does not make.

The interpreter lets a ``@triton.jit`` function read any module global; the GPU compiler accepts
only globals bound to ``tl.constexpr(...)`` (and imported modules or other jit functions). The
harness runs :func:`jit_global_errors` on every emitted module so CI catches this without a GPU.
"""
from __future__ import annotations

import ast
import builtins


def _is_jit(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def jit_global_errors(source: str) -> list[str]:
    """Names that a jit function reads from module scope which the GPU compiler would reject."""
    tree = ast.parse(source)
    allowed: set[str] = set(dir(builtins))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            allowed.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef) and _is_jit(node):
            allowed.add(node.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if ast.unparse(node.value.func) in ("tl.constexpr", "triton.language.constexpr"):
                allowed.update(t.id for t in node.targets if isinstance(t, ast.Name))
    errors = []
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and _is_jit(node)):
            continue
        local = {a.arg for a in node.args.args + node.args.kwonlyargs}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                local.add(sub.id)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                if sub.id not in local and sub.id not in allowed:
                    errors.append(f"{node.name} reads global {sub.id!r} that is not a tl.constexpr")
    return sorted(set(errors))
