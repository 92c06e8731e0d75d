"""The environment of a ``python -m ...`` subprocess that a test starts."""
from __future__ import annotations

import os
import subprocess
import sys
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


def bench_engine(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m experiments.bench_engine`` into ``run_dir`` (checkpoints beside it); asserts it exits 0."""
    cmd = [sys.executable, "-m", "experiments.bench_engine", f"hydra.run.dir={run_dir}",
           f"checkpoint_root={run_dir.parent / 'checkpoints'}", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=app_env())
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done
