"""Figures drawn from a results table (matplotlib, Agg backend, PNG).

Each function takes the table (one app's, or several collated) and an output folder, draws the
figure if the table has the rows it needs, and returns the PNG's path (None otherwise):
- ``convergence``: best-so-far against trial number, per sampler (autotune trials);
- ``throughput``: achieved TFLOP/s or GB/s per shape, tuned and default configs against baselines;
- ``roofline``: arithmetic intensity against achieved TFLOP/s under the run's measured ceilings;
- ``engine_throughput``: tokens/s and decode step time against batch size;
- ``engine_latency``: TTFT and TPOT (p50, p99) against request rate.
Titles carry the device and date of the rows drawn.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.shapes import shape_label  # noqa: E402

METRIC_LABEL = {"tflops": "achieved TFLOP/s", "gbps": "achieved GB/s"}


def _title(df: pd.DataFrame, what: str) -> str:
    devices = ", ".join(sorted(df["device"].dropna().astype(str).unique())) if "device" in df else "?"
    dates = ", ".join(sorted(df["date"].dropna().astype(str).unique())) if "date" in df else "?"
    return f"{what}\n{devices} · {dates}"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(df: pd.DataFrame) -> pd.Series:
    """Legend label of each row: its impl, with the sampler for tuned/trial rows of a sweep."""
    label = df["impl"].astype(str)
    if "sampler" in df:
        tuned = df["impl"].isin(["tuned", "trial"]) & df["sampler"].notna()
        label = label.where(~tuned, label + " (" + df["sampler"].astype(str) + ")")
    return label


def _kernel_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "family" not in df or "ms" not in df:
        return df.iloc[0:0]
    return df[df["family"].notna() & np.isfinite(pd.to_numeric(df["ms"], errors="coerce"))]


def _workload_rows(df: pd.DataFrame, workload: str) -> pd.DataFrame:
    """The engine benchmark's rows of one workload (none when the table has no workload column)."""
    if "workload" not in df:
        return df.iloc[0:0]
    return df[df["workload"] == workload]


def convergence(df: pd.DataFrame, out: Path) -> Path | None:
    """Per family, per sampler: the geometric mean over shapes (and seeds, runs) of
    best-found ms / best-so-far ms after each trial, where best-found is the fastest trial of that
    shape in the whole table (the exhaustive sampler's, when it ran). 1.0 = the best found."""
    if "impl" not in df or "sampler" not in df:
        return None
    t = df[df["impl"] == "trial"]  # failed trials included: they spend a trial and keep the best so far
    if t.empty:
        return None
    t = t.assign(ms=pd.to_numeric(t["ms"], errors="coerce"))
    shape_keys = ["family", "dtype", "shape"]
    best = t.groupby(shape_keys)["ms"].transform("min")
    t = t.assign(best=best)
    curve_keys = shape_keys + ["sampler"] + [k for k in ("seed", "run") if k in t]
    families = sorted(t["family"].unique())
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        for sampler, g in t[t["family"] == fam].groupby("sampler"):
            curves = []
            for _, c in g.groupby(curve_keys):
                c = c.sort_values("trial")
                frac = (c["best"] / c["ms"].cummin()).ffill().fillna(0.0).to_numpy()
                curves.append(frac)
            n = max(len(c) for c in curves)
            padded = np.array([np.pad(c, (0, n - len(c)), mode="edge") for c in curves])
            geo = np.exp(np.log(np.clip(padded, 1e-9, None)).mean(axis=0))
            ax.plot(np.arange(1, n + 1), geo, marker=".", label=f"{sampler} ({len(curves)} studies)")
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("best found / best so far (speed fraction)")
        ax.set_ylim(0, 1.05)
        ax.set_title(fam)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_title(t, "Autotune convergence"))
    return _save(fig, out / "convergence.png")


def throughput(df: pd.DataFrame, out: Path) -> Path | None:
    """Grouped bars per shape: each impl's achieved TFLOP/s (compute-bound families) or GB/s."""
    k = _kernel_rows(df)
    if k.empty:
        return None
    k = k[k["impl"] != "trial"]
    if k.empty:
        return None
    k = k.assign(series=_series(k), label=k["shape"].map(lambda s: shape_label(json.loads(s))))
    panels = list(k.groupby(["family", "dtype"], sort=True))
    widest = max(g["label"].nunique() for _, g in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.9 * widest + 2), 4 * len(panels)), squeeze=False)
    for ax, ((fam, dtype), g) in zip(axes[:, 0], panels):
        metric = str(g["metric"].iloc[0]) if "metric" in g else "tflops"
        table = g.pivot_table(index="label", columns="series", values=metric, aggfunc="max", sort=False)
        table.plot.bar(ax=ax, width=0.8, rot=30, logy=True)  # decode and prefill shapes differ by decades
        ax.legend(title="implementation", fontsize=8)
        ax.set_xlabel("shape")
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.set_title(f"{fam} ({dtype})")
        ax.grid(axis="y", alpha=0.3)
        for lbl in ax.get_xticklabels():
            lbl.set_ha("right")
            lbl.set_fontsize(7)
    fig.suptitle(_title(k, "Achieved throughput per shape"))
    return _save(fig, out / "throughput.png")


def roofline(df: pd.DataFrame, out: Path) -> Path | None:
    """Achieved TFLOP/s against arithmetic intensity (FLOP/byte), under min(peak, intensity x bandwidth)."""
    k = _kernel_rows(df)
    if k.empty:
        return None
    k = k[(k["impl"] != "trial") & (pd.to_numeric(k["intensity"], errors="coerce") > 0)]  # log axes: FLOPs > 0
    if k.empty:
        return None
    k = k.assign(series=_series(k))
    fig, ax = plt.subplots(figsize=(7, 5))
    ridge = (k["ceiling_tflops"] * 1e3 / k["ceiling_gbps"]).median()  # FLOP/byte where the roofs meet
    xs = np.geomspace(min(k["intensity"].min(), ridge) / 4, max(k["intensity"].max(), ridge) * 4, 200)
    for device, g in k.groupby("device"):
        peak, bw = g["ceiling_tflops"].median(), g["ceiling_gbps"].median()
        ax.plot(xs, np.minimum(peak, xs * bw / 1e3), "k-" if len(k["device"].unique()) == 1 else "-", lw=1.5,
                label=f"roof {device}: {peak:.3g} TFLOP/s, {bw:.4g} GB/s (measured)")
    markers = dict(zip(sorted(k["family"].unique()), "osD^v<>ph*"))
    for (series, fam), g in k.groupby(["series", "family"]):
        ax.scatter(g["intensity"], g["tflops"], marker=markers[fam], label=f"{fam}: {series}", alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(_title(k, "Roofline"))
    return _save(fig, out / "roofline.png")


def engine_throughput(df: pd.DataFrame, out: Path) -> Path | None:
    """Output tokens/s and ms per decode step against batch size, one line per backend."""
    e = _workload_rows(df, "batch_sweep")
    if e.empty:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, g in e.groupby("impl"):
        g = g.sort_values("batch")
        a1.plot(g["batch"], g["tokens_per_s"], marker="o", label=impl)
        a2.plot(g["batch"], g["step_ms"], marker="o", label=impl)
    for ax, ylabel in ((a1, "output tokens/s"), (a2, "ms per decode step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(_title(e, "Engine throughput vs batch size"))
    return _save(fig, out / "engine_throughput.png")


def engine_latency(df: pd.DataFrame, out: Path) -> Path | None:
    """TTFT and TPOT at p50 (solid) and p99 (dashed) against the Poisson request rate."""
    e = _workload_rows(df, "online")
    if e.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for i, (impl, g) in enumerate(e.groupby("impl")):
            g = g.sort_values("rate")
            color = f"C{i}"
            ax.plot(g["rate"], g[f"{metric}_p50_ms"], "-o", color=color, label=f"{impl} p50")
            ax.plot(g["rate"], g[f"{metric}_p99_ms"], "--s", color=color, label=f"{impl} p99")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(_title(e, "Engine latency vs request rate"))
    return _save(fig, out / "engine_latency.png")


FIGURES = (convergence, throughput, roofline, engine_throughput, engine_latency)


def draw_all(df: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure ``df`` has rows for, written into ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    if df.empty:
        return []
    return [p for f in FIGURES if (p := f(df, out)) is not None]
