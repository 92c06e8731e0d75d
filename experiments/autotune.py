"""Autotune sweep: tune one kernel family over a shape set with ``autotune.tune``.

    python -m experiments.autotune                                        # gemm, CPU tiny / GPU Llama shapes
    python -m experiments.autotune -m kernel=gemm,attention_prefill sampler=tpe,random
    python -m experiments.autotune sampler=exhaustive shapes=tiny         # ground truth for convergence

For each shape, ``autotune.tune`` runs an Optuna study (warm-started, every candidate checked
against the reference before it is timed, the winner confirmed) and merges the winner into the
device's best-config cache (``results/cache/`` unless ``cache_path`` says otherwise). While it runs,
each finished trial is read back from the study (``experiments.trial_stream``) to advance the
progress bar and stream ``trial/*`` metrics to W&B. The studies live in the run folder's
``optuna.db`` unless ``storage`` names a shared one (to resume, or to share across machines), so
that two samplers of one multirun never share a study.

Writes results.csv (a row per evaluated trial, the confirmed winner, and the baseline timed beside
it), the convergence, throughput and roofline figures, and logs them with the cache as an artifact.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

import autotune
from autotune.tuner import TuneResult, resolve_storage, study_name
from experiments.context import Run, family, fail, pick, start
from experiments.measure import Ceilings, measure_ceilings
from experiments.shapes import shape_set
from experiments.table import add_speedups, kernel_row
from experiments.trial_stream import TrialStream
from kernels.family import Family

BASELINE = "torch"  # autotune times the family's PyTorch op as is: cuBLAS for gemm, SDPA for attention


def result_rows(run: Run, fam: Family, shape: dict, res: TuneResult, cfg: DictConfig, ceilings: Ceilings) -> list[dict]:
    """Rows of one tuned shape: every evaluated trial in order, the confirmed winner, the baseline."""
    meta = {"sampler": cfg.sampler.name, "seed": cfg.seed}

    def row(impl: str, config: dict | None, ms: float, spread: float, **extra: Any) -> dict:
        return kernel_row(run.env, fam, shape, run.dtype, impl, config, ms, spread, ceilings, cfg.kernel.metric,
                          **meta, **extra)

    rows = []
    trials = res.trials[res.trials["status"].isin(["ok", "failed"])].sort_values("number")
    for i, t in enumerate(trials.itertuples(), start=1):
        ms = t.ms if t.status == "ok" else math.nan
        rows.append(row("trial", t.config, ms, (t.ms_p80 - t.ms_p20) if t.status == "ok" else math.nan,
                        trial=i, optuna_number=t.number, state=t.status, reason=t.reason or ""))
    rows.append(row("tuned", res.config, res.ms, res.ms_p80 - res.ms_p20, trials=res.n_trials,
                    new_trials=res.new_trials, failed_trials=res.failed_trials,
                    confirmed=res.entry.get("confirmed"), state="ok"))
    if res.baseline_ms:
        rows.append(row(BASELINE, None, res.baseline_ms, math.nan, state="ok"))
    return rows


def tune_shape(run: Run, fam: Family, shape: dict, index: int, n_shapes: int, cfg: DictConfig, storage_url: str,
               bar: tqdm) -> TuneResult | None:
    """Tune one shape, streaming its trials to the progress bar and the logger; None when no config passed."""
    best = math.inf

    def on_trial(t: dict) -> None:
        nonlocal best
        if t["status"] == "ok":
            best = min(best, t["ms"])
        bar.update(1)
        bar.set_postfix(shape=f"{index + 1}/{n_shapes}", best_ms=f"{best:.4g}")
        run.logger.log_metrics({"trial/shape_index": index, "trial/number": t["number"],
                                "trial/ok": t["status"] == "ok", "trial/ms": t["ms"] if t["status"] == "ok" else None,
                                "trial/best_ms": best if math.isfinite(best) else None})

    n_trials = None if cfg.sampler.get("all_configs") else int(cfg.n_trials)
    storage = resolve_storage(storage_url)
    with TrialStream(storage, study_name(fam, shape, run.dtype), on_trial):
        try:
            return autotune.tune(fam.name, shape, run.dtype, n_trials=n_trials, sampler=cfg.sampler.name,
                                 seed=cfg.seed, cache_path=cfg.cache_path, storage=storage,
                                 warm_start=cfg.warm_start, timeout_s=cfg.timeout_s)
        except autotune.TuneError as e:
            tqdm.write(f"autotune: {fam.name} {shape}: {e}")
            return None
        except ImportError as e:  # a sampler's optional dependency (gp needs scipy)
            fail(f"sampler={cfg.sampler.name}: {e}")


@hydra.main(config_path="../conf", config_name="autotune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run = start(cfg, "autotune")
    fam = family(cfg.kernel.name)
    try:
        shapes = shape_set(pick(cfg.shapes, run.device), fam)
    except ValueError as e:
        fail(str(e))
    storage_url = cfg.storage or f"sqlite:///{(run.dir / 'optuna.db').resolve()}"
    ceilings = measure_ceilings(run.device, run.dtype)
    if cfg.sampler.get("all_configs"):
        total = sum(len(fam.configs(shape, run.dtype)) for shape in shapes)
    else:
        total = len(shapes) * int(cfg.n_trials)
    rows: list[dict] = []
    results: list[TuneResult] = []
    desc = f"autotune {fam.name} {run.dtype} ({cfg.sampler.name})"
    with tqdm(total=total, desc=desc, unit="trial") as bar:
        for i, shape in enumerate(shapes):
            res = tune_shape(run, fam, shape, i, len(shapes), cfg, storage_url, bar)
            if res is not None:
                results.append(res)
                rows += result_rows(run, fam, shape, res, cfg, ceilings)
    add_speedups(rows, [BASELINE])
    cache_path = results[0].cache_path if results else None
    run.finish(rows, _summary(fam.name, cfg, len(shapes), results, rows, cache_path),
               artifacts=((cache_path, "autotune-cache"),) if cache_path else ())


def _summary(name: str, cfg: DictConfig, n_shapes: int, results: list[TuneResult], rows: list[dict],
             cache_path: Path | None) -> str:
    """'gemm tpe: 4/4 shapes tuned in 16 trials, 0.8x torch (geomean), cache results/cache/x.json'."""
    speedups = pd.Series([r["speedup"] for r in rows if r["impl"] == "tuned"], dtype=float).dropna()
    versus = f", {math.exp(speedups.map(math.log).mean()):.3g}x {BASELINE} (geomean)" if len(speedups) else ""
    trials = sum(r.n_trials for r in results)
    return f"{name} {cfg.sampler.name}: {len(results)}/{n_shapes} shapes tuned in {trials} trials{versus}, cache {cache_path}"


if __name__ == "__main__":
    main()
