"""Tuning efficiency: how many trials each sampler needs to come within 97% / 99% of the best.

    python -m autotune.efficiency --family gemm --dtype float16        # CPU: tiny shapes, ~1 minute
    python -m autotune.efficiency --family gemm --dtype bfloat16 --shapes suite:1,9,16,24 \\
        --max-configs 250 --seeds 5 --trials-per-seed 50                 # GPU: four suite shapes
    python -m autotune.efficiency --family gemm --dtype bfloat16 --shapes suite:3,10,16,23 \\
        --space "variant=tma_persistent_subtile,tma_stream_k;GROUP_M=8;BLOCK_M=64,128,256;BLOCK_N=64,128,256;BLOCK_K=32,64,128" \\
        --seeds 5 --trials-per-seed 60                                   # GPU: every config of a sub-grid
    python -m autotune.efficiency --table results/efficiency/gemm_bfloat16_nvidia_h200_exhaustive.csv \\
        --seeds 5 --trials-per-seed 40                                   # any machine: replay a measured run

Method. For each shape, the ``exhaustive`` sampler measures every valid config once through the
real pipeline (:func:`autotune.tune`: worker processes, correctness gate, timing); with
``--max-configs`` a seeded random subset of that many valid configs is measured instead, and that
subset is the space the samplers search. ``--space`` cuts the family's space down to a sub-grid
(:func:`autotune.space.restrict`) measured whole: unlike a random subset, it keeps each config's
neighbours, the structure model-based samplers learn from. The measured table is then the ground truth: each sampler
(``tpe``, ``gp``, ``random``; and ``tpe+warm``, TPE warm-started with the default config and the
exhaustive winners of the other shapes, nearest first) runs its search loop
(:func:`autotune.search.run_search`, the same loop as a real tune: rejects and duplicates are free)
against the table, once per seed, so many seeds cost no device time. A trial's cost is one
evaluated config; a failed config counts as a trial and improves nothing. A replay (``--table``)
of a device in ``kernels.device.KNOWN_DEVICES`` runs as that device, so the warm start's default
config is the one the tuner would enqueue there. When a table's shapes are those the default was
chosen from, that first trial is in sample: judge the warm start on other shapes.

Reported per (shape, sampler, seed): the trials needed until the best time so far is within 97%
and 99% of the exhaustive best (best_ms / best_so_far >= 0.97), also as a fraction of the space's
configs. Per sampler: medians over runs, and the share of shapes whose median run reached 97% within
10% of the space. Written under ``results/efficiency/``: ``<name>_runs.csv``, ``<name>_summary.csv``,
``<name>_exhaustive.csv`` (the measured table) and ``<name>_best_so_far.png`` (mean over seeds of
best/best-so-far against trials, one panel per shape); the exhaustive studies are kept in
``results/efficiency_<name>.db`` (git-ignored), so a rerun replays without measuring again.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

import autotune  # noqa: E402
from autotune import cache, families  # noqa: E402
from autotune.paths import results_dir  # noqa: E402
from autotune.search import make_sampler, run_search  # noqa: E402
from autotune.space import Config, SearchSpace, config_key, parse_restriction  # noqa: E402
from autotune.tune_suite import GEMM_SUITE  # noqa: E402
from autotune.tuner import _version, warm_configs  # noqa: E402
from kernels.device import assume_device, device_facts, device_key, known_device  # noqa: E402
from kernels.family import Family  # noqa: E402

LEVELS = (0.97, 0.99)
SAMPLERS = ("tpe", "gp", "random", "tpe+warm")


def parse_shapes(text: str | None, family: Family) -> list[dict[str, Any]]:
    """Shapes from ``"M=37,N=29,K=45;M=1,N=64,K=96"``, ``"suite"`` / ``"suite:0,7"`` (the GEMM suite,
    or some of its indices) or None (the family's first two tiny shapes)."""
    if not text:
        return family.tiny_shapes()[:2]
    if text.startswith("suite"):
        picks = text.partition(":")[2]
        return [GEMM_SUITE[int(i)] for i in picks.split(",")] if picks else list(GEMM_SUITE)
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        shape = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"shape item {item!r} in {part!r} is not key=value")
            low = value.strip().lower()
            shape[key.strip()] = low == "true" if low in ("true", "false") else int(value)
        shapes.append(shape)
    return shapes


def measure(family: Family, shape: dict, dtype: str, max_configs: int | None, storage: str, cache_path: Path,
            timeout_s: float, only: dict[str, list] | None = None) -> pd.DataFrame:
    """The exhaustive pass: one row per measured config (``key``, ``config``, ``status``, ``ms``)."""
    res = autotune.tune(family, shape, dtype, n_trials=max_configs, sampler="exhaustive", seed=0, cache_path=cache_path,
                        storage=storage, warm_start=False, confirm_top=0, timeout_s=timeout_s, progress=True,
                        space=only)
    done = res.trials[res.trials["status"].isin(["ok", "failed"])]
    return pd.DataFrame({
        "key": [config_key(c) for c in done["config"]], "config": list(done["config"]),
        "status": list(done["status"]), "ms": [m if s == "ok" else math.inf for m, s in zip(done["ms"], done["status"])],
    }).drop_duplicates("key")


class _Replay:
    """An evaluator answering from the exhaustive table."""

    def __init__(self, table: pd.DataFrame):
        self.ms = dict(zip(table["key"], table["ms"]))
        self.curve: list[float] = []

    def precompile(self, config: Config) -> None:
        return None

    def evaluate(self, config: Config) -> dict:
        ms = self.ms[config_key(config)]
        self.curve.append(ms)
        if math.isinf(ms):
            return {"status": "failed", "reason": "failed in the exhaustive pass"}
        return {"status": "ok", "ms": ms, "ms_p20": ms, "ms_p80": ms}


def replay(family: Family, shape: dict, dtype: str, table: pd.DataFrame, sampler: str, seed: int, budget: int,
           warm: list[Config]) -> list[float]:
    """Times of the configs one sampler evaluates, in order, searching the measured table."""
    valid = list(table["config"])
    measured = set(table["key"])
    ev = _Replay(table)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="minimize",
                                sampler=make_sampler(sampler.split("+")[0], seed, budget))

    def reject(config: Config) -> str | None:
        return family.reject(shape, dtype, config) or (None if config_key(config) in measured else "not measured")

    # The samplers search the family's space less the values no measured config has (a variant added
    # to the family after the table was measured, say): such values could only ever be rejected.
    space = {k: [v for v in values if any(c[k] == v for c in valid)] for k, values in family.space(shape, dtype).items()}
    run_search(study, SearchSpace(space), valid, reject, min(budget, len(valid)), ev, warm=warm, seed=seed)
    return ev.curve


def trials_to(curve: list[float], best: float, level: float) -> float:
    """1-based trial at which the best so far reaches ``level`` of the best performance; NaN if never."""
    so_far = math.inf
    for i, ms in enumerate(curve, 1):
        so_far = min(so_far, ms)
        if best / so_far >= level:
            return float(i)
    return math.nan


def _plot(curves: pd.DataFrame, path: Path, title: str) -> None:
    shapes = list(dict.fromkeys(curves["shape"]))
    cols = min(3, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        sub = curves[curves["shape"] == shape]
        for sampler, grp in sub.groupby("sampler", sort=False):
            mean = grp.groupby("trial")["fraction_of_best"].mean()
            ax.plot(mean.index, mean.values, label=sampler)
        for level in LEVELS:
            ax.axhline(level, color="grey", lw=0.7, ls="--")
        ax.set_title(f"{shape} ({int(sub['n_configs'].iloc[0])} configs)", fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel("best / best so far")
        ax.set_ylim(max(0.0, min(0.5, sub["fraction_of_best"].min())), 1.005)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="gemm")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--shapes", default=None, help='"M=37,N=29,K=45;M=1,N=64,K=96", "suite" or "suite:0,7"')
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--trials-per-seed", type=int, default=20)
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--max-configs", type=int, default=None, help="measure a random subset of this many configs")
    parser.add_argument("--space", default=None,
                        help='measure every config of a sub-grid: "variant=tma_stream_k,tma;GROUP_M=8" (key=values;...)')
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one candidate may take")
    parser.add_argument("--time-limit-min", type=float, default=9.0,
                        help="measure no new shape after this many minutes (a rerun resumes)")
    parser.add_argument("--measure-only", action="store_true",
                        help="write the measured table and stop (replay it on any machine with --table)")
    parser.add_argument("--out", default=None, help="folder for the tables and the plot (default results/efficiency)")
    parser.add_argument("--table", default=None,
                        help="replay the samplers against an earlier run's <name>_exhaustive.csv instead of measuring "
                             "(any machine; family, dtype, shapes and device come from the table)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    measured = load_table(Path(args.table)) if args.table else None
    if measured is not None:
        args.family, args.dtype = measured["family"], measured["dtype"]
    family = families.resolve(args.family)
    only = parse_restriction(args.space) if args.space else None
    if measured is not None and (only is not None or args.measure_only):
        parser.error("--space and --measure-only apply to a measuring run; a replay searches the configs its table holds")
    shapes = measured["shapes"] if measured is not None else parse_shapes(args.shapes, family)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for s in samplers:
        if s not in SAMPLERS:
            parser.error(f"unknown sampler {s!r}; choose from {list(SAMPLERS)}")
    if "gp" in samplers:
        try:
            import scipy  # noqa: F401
        except ImportError:
            print("scipy is not installed: skipping the gp sampler")
            samplers.remove("gp")
    facts = device_facts()
    device_name, dev_key = (measured["device"], device_key(measured["device"])) if measured is not None else (facts.name, facts.key)
    space_text = args.space or (measured["space"] if measured is not None else "")
    # A sub-grid's report sits beside the whole-space one instead of replacing it.
    name = f"{family.name}_{args.dtype}_{dev_key}" + ("_subgrid" if space_text else "")
    # A replay writes next to the working files unless told otherwise: it must not overwrite the
    # measured run's report by accident.
    default_out = results_dir() / "runs" / "efficiency_replay" if measured is not None else results_dir() / "efficiency"
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    # The exhaustive studies and their cache entries are working files: git-ignored places by default.
    storage = str(out / f"efficiency_{name}.db") if args.out else str(results_dir() / f"efficiency_{name}.db")
    scratch = out if args.out else results_dir() / "runs" / "efficiency"
    scratch.mkdir(parents=True, exist_ok=True)

    tables, start = (dict(measured["tables"]) if measured is not None else {}), time.perf_counter()
    for shape in shapes if measured is None else []:
        if time.perf_counter() - start > args.time_limit_min * 60:
            print(f"time limit reached after measuring {len(tables)} of {len(shapes)} shapes; rerun the same "
                  "command to measure the rest (measured configs are kept) and write the report")
            return pd.DataFrame()
        tables[cache.shape_key(shape)] = measure(family, shape, args.dtype, args.max_configs, storage,
                                                 scratch / f"{name}_cache.json", args.timeout, only)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if measured is not None:  # the measurements' provenance, and when they were replayed
        stamp = {"family": family.name, "dtype": args.dtype, "device": device_name, "torch": measured["torch"],
                 "triton": measured["triton"], "date": measured["date"], "space": space_text, "replayed": now}
    else:
        stamp = {"family": family.name, "dtype": args.dtype, "device": device_name, "torch": _version("torch"),
                 "triton": _version("triton"), "date": now, "space": space_text}
    if args.measure_only:
        _write_tables(tables, stamp, out / f"{name}_exhaustive.csv")
        print(f"wrote {out / (name + '_exhaustive.csv')}; replay it anywhere with --table")
        return pd.DataFrame()
    winners = {}
    for shape in shapes:
        table = tables[cache.shape_key(shape)]
        best = table.loc[table["ms"].idxmin()]
        winners[cache.entry_key(family.name, args.dtype, shape)] = {
            "family": family.name, "dtype": args.dtype, "shape": shape, "config": best["config"],
            "device_key": dev_key}

    # A replay answers as the measured device where its facts are known (kernels.device.KNOWN_DEVICES):
    # the warm start's default config is then the one the tuner enqueues there.
    with assume_device(known_device(dev_key) if measured is not None else None):
        runs, curves = _replay_all(family, shapes, args, tables, winners, samplers, dev_key)
    runs_df = pd.DataFrame(runs).assign(**stamp)
    summary = summarize(runs_df).assign(**stamp)
    runs_df.to_csv(out / f"{name}_runs.csv", index=False)
    summary.to_csv(out / f"{name}_summary.csv", index=False)
    _write_tables(tables, stamp, out / f"{name}_exhaustive.csv")
    curves_df = pd.DataFrame(curves)
    curves_df.to_csv(out / f"{name}_curves.csv", index=False)  # so the figure can be redrawn
    _plot(curves_df, out / f"{name}_best_so_far.png",
          f"{family.name} {args.dtype}: best so far per sampler (mean over seeds) -- {device_name}, {stamp['date'][:10]}")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.drop(columns=list(stamp)).set_index("sampler").T.to_string(float_format=lambda x: f"{x:.3g}"))
    print(f"wrote {out / (name + '_runs.csv')}, {name}_summary.csv, {name}_exhaustive.csv and {name}_best_so_far.png")
    return summary


def _replay_all(family: Family, shapes: list[dict], args: argparse.Namespace, tables: dict[str, pd.DataFrame],
                winners: dict[str, dict], samplers: list[str], dev_key: str) -> tuple[list[dict], list[dict]]:
    """Each sampler's runs (a row per shape and seed) and best-so-far curves, searching the measured tables."""
    runs, curves = [], []
    for shape in shapes:
        skey = cache.shape_key(shape)
        table = tables[skey]
        best_ms, n = float(table["ms"].min()), len(table)
        others = {k: v for k, v in winners.items() if v["shape"] != shape}
        for sampler in samplers:
            # The neighbours' winners on the measured device, after the default config: the measured
            # device's where it is known, else this machine's (like every warm config, the search
            # projects it onto the nearest config the table holds).
            warm = warm_configs(family, shape, args.dtype, others, dev_key) if sampler == "tpe+warm" else []
            for seed in range(args.seeds):
                curve = replay(family, shape, args.dtype, table, sampler, seed, args.trials_per_seed, warm)
                row = {"shape": skey, "sampler": sampler, "seed": seed, "n_configs": n, "budget": len(curve),
                       "best_ms": best_ms, "final_fraction": best_ms / min(curve)}
                for level in LEVELS:
                    t = trials_to(curve, best_ms, level)
                    pct = int(level * 100)
                    row[f"trials_to_{pct}"] = t
                    row[f"space_fraction_to_{pct}"] = t / n
                runs.append(row)
                so_far = math.inf
                for i, ms in enumerate(curve, 1):
                    so_far = min(so_far, ms)
                    curves.append({"shape": skey, "sampler": sampler, "seed": seed, "trial": i, "n_configs": n,
                                   "fraction_of_best": best_ms / so_far})
    return runs, curves


def _write_tables(tables: dict[str, pd.DataFrame], stamp: dict[str, str], path: Path) -> None:
    """The measured tables as one CSV (a row per config, its shape key and the run's stamp): the
    file :func:`load_table` reads."""
    pd.concat([t.assign(shape=k, config=[json.dumps(c, sort_keys=True) for c in t["config"]]).drop(columns="key")
               for k, t in tables.items()]).assign(**stamp).to_csv(path, index=False)


def load_table(path: Path) -> dict[str, Any]:
    """An earlier run's ``<name>_exhaustive.csv``: its family, dtype, device, versions, date, shapes
    (in the file's order) and one measured table per shape key (``key``, ``config``, ``status``,
    ``ms`` with failed configs at infinity), as :func:`measure` returns them."""
    if not path.is_file():
        raise FileNotFoundError(f"no measured table at {path}")
    df = pd.read_csv(path)
    missing = {"config", "status", "ms", "shape", "family", "dtype", "device", "torch", "triton", "date"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} is not an efficiency run's exhaustive table: columns {sorted(missing)} are missing")
    for col in ("family", "dtype", "device"):
        if df[col].nunique() != 1:
            raise ValueError(f"{path} mixes several values of {col!r}: {sorted(df[col].unique())}")
    first = df.iloc[0]
    family = families.resolve(str(first["family"]))
    tables, shapes = {}, []
    for skey, grp in df.groupby("shape", sort=False):
        shape = parse_shapes(str(skey), family)[0]
        if cache.shape_key(shape) != skey:
            raise ValueError(f"{path}: shape {skey!r} does not read back as itself")
        configs = [json.loads(c) for c in grp["config"]]
        tables[skey] = pd.DataFrame({
            "key": [config_key(c) for c in configs], "config": configs, "status": list(grp["status"]),
            "ms": [float(m) if s == "ok" else math.inf for m, s in zip(grp["ms"], grp["status"])],
        })
        shapes.append(shape)
    return {"family": family.name, "dtype": str(first["dtype"]), "device": str(first["device"]),
            "torch": str(first["torch"]), "triton": str(first["triton"]), "date": str(first["date"]),
            "space": str(first["space"]) if "space" in df.columns and isinstance(first["space"], str) else "",
            "shapes": shapes, "tables": tables}


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per sampler: median trials and space fraction to 97%/99% (runs that never got there count as
    infinite), the share of runs that got there, and the share of shapes whose median run reached
    the level within 10% of the space's configs."""
    rows = []
    for sampler, grp in runs.groupby("sampler", sort=False):
        row: dict[str, Any] = {"sampler": sampler, "runs": len(grp), "shapes": grp["shape"].nunique()}
        for level in LEVELS:
            pct = int(level * 100)
            t = grp[f"trials_to_{pct}"].fillna(math.inf)
            frac = grp[f"space_fraction_to_{pct}"].fillna(math.inf)
            per_shape = frac.groupby(grp["shape"]).median()
            row[f"median_trials_to_{pct}"] = float(t.median())
            row[f"median_space_fraction_to_{pct}"] = float(frac.median())
            row[f"runs_reaching_{pct}"] = float((t < math.inf).mean())
            row[f"shapes_{pct}_within_10pct_of_space"] = float((per_shape <= 0.10).mean())
        row["mean_final_fraction"] = float(grp["final_fraction"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
