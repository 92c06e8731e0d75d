"""Redraw figures from saved tables; collate a multirun's tables into one.

    python -m experiments.plot                                  # the newest run or multirun folder
    python -m experiments.plot 'runs=[results/runs/autotune/multirun_2026-11-27_10-00-00]'
    python -m experiments.plot 'runs=[a/results.csv,b/results.csv]'

Every results.csv under ``runs`` (folders searched recursively) is read, tagged with its folder,
concatenated into this run's results.csv, and every figure the rows support is drawn from it
(``experiments.plots``): sampler convergence from autotune trials, throughput and roofline from
kernel rows, throughput and latency from engine rows.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments import plots
from experiments.context import fail
from experiments.table import collate

RUNS_ROOT = Path("results/runs")


def newest_run(root: Path) -> Path:
    """The folder (run, or the multirun holding it) of the newest results.csv under ``root``,
    the plot app's own runs aside."""
    tables = [t for t in root.rglob("results.csv") if t.relative_to(root).parts[0] != "plot"]
    if not tables:
        fail(f"no results.csv under {root}/; run an app first or pass runs=[...]")
    newest = max(tables, key=lambda t: t.stat().st_mtime).parent
    return newest.parent if newest.parent.name.startswith("multirun_") else newest


@hydra.main(config_path="../conf", config_name="plot", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    paths = [Path(p) for p in cfg.runs] or [newest_run(RUNS_ROOT)]
    try:
        df = collate(paths)
    except FileNotFoundError as e:
        fail(str(e))
    df.to_csv(out / "results.csv", index=False)
    figures = plots.draw_all(df, out)
    runs = df["run"].nunique() if "run" in df else 0
    names = ", ".join(p.name for p in figures) or "none (no rows a figure needs)"
    print(f"plot: {len(df)} rows from {runs} runs collated into {out / 'results.csv'}; figures: {names} in {out}")


if __name__ == "__main__":
    main()
