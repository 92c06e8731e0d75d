"""Weights & Biases logging for the experiment apps.

``logger.mode``:
- ``offline`` (default): the run is written under the run folder (``<run>/wandb/offline-run-*``);
  at the end the app prints the ``wandb sync`` command that uploads it.
- ``online``: streams to the W&B server; needs ``wandb login`` (or ``WANDB_API_KEY``) first.
- ``disabled``: a logger that does nothing; ``wandb`` is never imported.

A run logs its resolved config, metrics as they come (each trial of a sweep), the results table as
a ``wandb.Table``, the figures, and files such as the best-config cache as artifacts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

MODES = ("offline", "online", "disabled")


class LoggerSetupError(Exception):
    """The logger's settings are wrong or W&B refused them (message says which and what to do)."""


class Logger:
    """Logs nothing: ``logger.mode=disabled``. :class:`WandbLogger` overrides every method."""

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """One step of live metrics (e.g. one autotune trial)."""

    def log_table(self, name: str, df: pd.DataFrame) -> None:
        """A results table."""

    def log_images(self, paths: list[Path]) -> None:
        """Figures (PNG files), one key per file name."""

    def log_artifact(self, path: Path, kind: str) -> None:
        """A file (e.g. the best-config cache) as a versioned artifact of type ``kind``."""

    def finish(self) -> None:
        """Close the run; tell the user where it is."""


class WandbLogger(Logger):
    """A W&B run, offline or online, whose files live in the run folder."""

    def __init__(self, settings: DictConfig, config: dict, run_dir: Path, job_type: str, group: str | None):
        import wandb  # only here: logger.mode=disabled must not import wandb at all

        self._wandb = wandb
        self.mode = settings.mode
        try:
            self.run = wandb.init(
                mode=self.mode,
                project=settings.project,
                entity=settings.entity,
                tags=list(settings.tags),
                group=group,
                job_type=job_type,
                name=f"{job_type}/{run_dir.parent.name}/{run_dir.name}",
                config=config,
                dir=str(run_dir),
                settings=wandb.Settings(quiet=True, console="off"),
            )
        except (wandb.errors.Error, OSError) as e:
            hint = "; logger.mode=offline keeps the run local for a later `wandb sync`" if self.mode == "online" else ""
            raise LoggerSetupError(f"W&B {self.mode} run could not start: {e}{hint}") from None

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics)

    def log_table(self, name: str, df: pd.DataFrame) -> None:
        # W&B tables take plain column types; NaN stays NaN, objects become text.
        self.run.log({name: self._wandb.Table(dataframe=df.astype({c: str for c in df.columns if df[c].dtype == object}))})

    def log_images(self, paths: list[Path]) -> None:
        if paths:
            self.run.log({f"figures/{p.stem}": self._wandb.Image(str(p)) for p in paths})

    def log_artifact(self, path: Path, kind: str) -> None:
        if not Path(path).is_file():
            return
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem)
        artifact = self._wandb.Artifact(name, type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        sync_dir = self.run.settings.sync_dir
        url = self.run.url if self.mode == "online" else None
        self.run.finish()
        if self.mode == "offline":
            print(f"W&B offline run saved in {sync_dir}; upload it with: wandb sync {sync_dir}")
        elif url:
            print(f"W&B run: {url}")


def make_logger(settings: DictConfig, config: dict, run_dir: Path, job_type: str, group: str | None) -> Logger:
    """The logger ``settings.mode`` asks for; :class:`LoggerSetupError` for an unknown mode."""
    if settings.mode not in MODES:
        raise LoggerSetupError(f"logger.mode={settings.mode!r} is not one of {list(MODES)}")
    if settings.mode == "disabled":
        return Logger()
    return WandbLogger(settings, config, run_dir, job_type, group)
