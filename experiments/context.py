"""What every experiment app does first and last.

First: resolve ``device`` (auto | cpu | cuda) and ``dtype``, refuse GPU-only options on a CPU with a
one-line message (exit status 2, no traceback), collect the facts every table row carries (date,
device, torch and triton versions) and open the W&B logger.
Last: write ``results.csv``, draw the figures, hand both to the W&B logger and print one summary
line that points at the run folder.

Also registers the ``${by_device:CPU_VALUE,GPU_VALUE}`` resolver the configs use for defaults that
differ between a CPU-only machine and a GPU (trial counts, dtype).
"""
from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import kernels  # first: it picks Triton's backend before triton loads
from kernels.device import device_facts, interpreting
from kernels.family import DTYPES, Family
import triton  # noqa: E402,I001

from experiments import plots  # noqa: E402
from experiments.wandb_log import Logger, LoggerSetupError, make_logger  # noqa: E402

DEVICES = ("auto", "cpu", "cuda")


def fail(message: str) -> NoReturn:
    """Stop the app with ``message`` on stderr and exit status 2 (a usage error, not a crash)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_device(name: str) -> str:
    """'cpu' or 'cuda' for a ``device`` setting; a clear error for cuda without a GPU."""
    if name not in DEVICES:
        fail(f"device={name!r} is not one of {list(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        fail("device=cuda but no CUDA GPU is visible to torch; use device=cpu (the Triton interpreter) or device=auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _by_device(cpu_value: Any, gpu_value: Any, *, _root_: DictConfig) -> Any:
    return gpu_value if resolve_device(_root_.get("device", "auto")) == "cuda" else cpu_value


OmegaConf.register_new_resolver("by_device", _by_device, replace=True)


def pick(node: DictConfig, device: str) -> DictConfig:
    """The ``cpu`` or ``gpu`` branch of an ``auto`` group option (shapes, model, workload), else ``node``."""
    if node.get("name") == "auto":
        return node["gpu" if device == "cuda" else "cpu"]
    return node


def family(name: str) -> Family:
    """The registered kernel family ``name``; a usage error listing the registered ones otherwise."""
    try:
        return kernels.get_family(name)
    except ValueError as e:
        fail(f"kernel={name}: {e}")


@dataclass
class Run:
    """One app's run: its folder, device, dtype, the facts every row carries, and its logger."""

    app: str
    dir: Path
    device: str
    dtype: str
    env: dict[str, str]
    logger: Logger

    def finish(self, rows: list[dict], summary: str, artifacts: tuple[tuple[Path, str], ...] = ()) -> pd.DataFrame:
        """Write results.csv, draw the figures, log them, close the logger and print ``summary``.

        ``artifacts``: (file, W&B artifact type) pairs, e.g. the best-config cache.
        """
        df = pd.DataFrame(rows)
        csv = self.dir / "results.csv"
        df.to_csv(csv, index=False)
        figures = plots.draw_all(df, self.dir)
        self.logger.log_table("results", df)
        self.logger.log_images(figures)
        for path, kind in artifacts:
            self.logger.log_artifact(path, kind)
        self.logger.finish()
        print(f"{self.app}: {summary}; {len(df)} rows in {csv}, {len(figures)} figures in {self.dir}")
        return df


def start(cfg: DictConfig, app: str) -> Run:
    """Validate ``cfg.device`` and ``cfg.dtype``, open the logger."""
    device = resolve_device(cfg.device)
    if device == "cpu" and not interpreting():
        fail("device=cpu on a machine with a GPU: Triton compiles for the GPU unless its interpreter is chosen "
             "before it loads; run with TRITON_INTERPRET=1 in the environment")
    dtype = str(cfg.dtype)
    if dtype not in DTYPES:
        fail(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if dtype == "bfloat16" and device == "cpu":
        fail("dtype=bfloat16 needs a GPU: Triton's CPU interpreter computes bfloat16 dots wrongly; "
             "use dtype=float16 or dtype=float32 on the CPU")
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    env = {
        "date": dt.date.today().isoformat(),
        "device": device_facts(device).name,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    group = cfg.logger.group
    if group is None and hc.mode == RunMode.MULTIRUN:
        group = f"{app}/{Path(hc.sweep.dir).name}"
    try:
        logger = make_logger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), run_dir, app, group)
    except LoggerSetupError as e:
        fail(str(e))
    return Run(app, run_dir, device, dtype, env, logger)
