"""Where the autotuner keeps what it learns: the best-config caches and the Optuna studies.

Both live under the repository's ``results/`` folder (``$WORKBENCH_RESULTS`` overrides it), found
from this file rather than the working directory, so the engine finds the shipped caches wherever
it is started from.
"""
from __future__ import annotations

import os
from pathlib import Path

from kernels.device import device_facts


def results_dir() -> Path:
    """The results folder: ``$WORKBENCH_RESULTS``, else ``<repository>/results``."""
    root = os.environ.get("WORKBENCH_RESULTS")
    return Path(root) if root else Path(__file__).resolve().parent.parent / "results"


def default_cache_path(device_key: str | None = None) -> Path:
    """The best-config cache of a device: ``results/cache/<device key>.json`` (current device by default)."""
    return results_dir() / "cache" / f"{device_key or device_facts().key}.json"


def default_storage_url() -> str:
    """The Optuna storage used when none is given: the SQLite file ``results/optuna.db``."""
    path = results_dir() / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"
