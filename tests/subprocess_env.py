"""The environment of a ``python -m ...`` subprocess that a test starts."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pythonpath(*first: Path) -> str:
    """``first`` (stubs that must shadow real modules), the repository root, then the inherited
    PYTHONPATH: packages installed outside site-packages (the GPU machine's ``--target`` folder)
    must stay importable in the subprocess."""
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*(str(p) for p in first), str(ROOT), *([inherited] if inherited else [])])


def app_env(*first: Path) -> dict[str, str]:
    """This process's environment with W&B quiet and the module search path of :func:`pythonpath`."""
    return {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": pythonpath(*first)}
