"""``python -m experiments.bench_engine`` on the tiny checkpoint (CPU): every backend -- tuned and
default-config Triton, PyTorch, Hugging Face generate -- on every workload, the targets, the
per-kernel breakdown, the figures and the W&B run; and its tune-only mode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from subprocess_env import bench_engine

# With --gpu the app picks the GPU's model and workloads (Llama-3.2-1B, minutes per backend): the
# GPU measurement is that run itself, with results committed under results/.
pytestmark = pytest.mark.cpu_only(reason="the tiny-checkpoint run of CI; on the GPU, bench_engine's own run is the check")
ENGINES = ["engine-triton", "engine-triton-default", "engine-torch"]


def test_every_backend_on_every_workload(bench_engine_run: Path):
    df = pd.read_csv(bench_engine_run / "results.csv")
    assert not (bench_engine_run / "results_partial.csv").exists()  # only a run cut off leaves it
    assert {"date", "device", "torch", "triton", "transformers", "ceiling_gbps"} <= set(df.columns)
    assert df["tokens_per_s"].to_numpy() == pytest.approx((df["output_tokens"] / df["wall_s"]).to_numpy())
    sweep = df[df["workload"] == "batch_sweep"]
    for impl in [*ENGINES, "hf"]:
        g = sweep[sweep["impl"] == impl]
        assert list(g["batch"]) == [1, 3] and list(g["output_tokens"]) == [4, 12], impl
        assert (g["ttft_ms"] > 0).all(), impl
    assert (sweep.loc[sweep["impl"].isin(ENGINES), "step_ms"] > 0).all()  # measured decode steps
    offline = df[df["workload"] == "offline"]
    assert sorted(offline["impl"]) == sorted([*ENGINES, "hf", "hf"])  # HF once per candidate batch size
    engines = offline[offline["impl"].isin(ENGINES)]
    assert engines["output_tokens"].nunique() == 1 and (engines["requests"] == 4).all()  # the same requests
    warmed = engines.set_index("impl")["note"].fillna("").str.contains("untimed pass")
    assert warmed.to_dict() == {"engine-triton": True, "engine-triton-default": True, "engine-torch": False}
    hf = offline[offline["impl"] == "hf"]
    assert list(hf["requests"]) == [2, 4] and hf["note"].str.contains("requested tokens only").all()
    online = df[df["workload"] == "online"]
    assert sorted(online["impl"]) == sorted(ENGINES) and (online["rate"] == 4).all()
    for metric in ("ttft", "tpot", "itl"):
        assert (online[f"{metric}_p50_ms"] > 0).all() and (online[f"{metric}_p99_ms"] >= online[f"{metric}_p50_ms"]).all()
    assert not df.loc[df["impl"].isin(ENGINES), "cuda_graphs"].any()  # no CUDA here


def test_targets_breakdown_figures_and_wandb(bench_engine_run: Path):
    goals = pd.read_csv(bench_engine_run / "targets.csv")
    assert len(goals) == 4 and np.isfinite(goals["measured"]).all()
    step1 = goals[goals["target"].str.startswith("batch-1")].iloc[0]
    assert step1["measured"] == pytest.approx(step1["step_ms"] / step1["floor_ms"])
    for stem, backend in (("kernel_breakdown", "triton/tuned"), ("kernel_breakdown_triton-default", "triton/default")):
        kb = pd.read_csv(bench_engine_run / f"{stem}.csv")
        assert set(kb["phase"]) == {"prefill", "decode"} and (kb["backend"] == backend).all()
        assert set(kb.loc[kb["phase"] == "decode", "seqs"]) == {1, 2}  # one decode step per profiled batch size
        assert {"qkv_proj", "attention", "lm_head", "kernels", "step (eager)"} <= set(kb["operator"])
    for fig in ("engine_throughput.png", "engine_latency.png", "engine_offline.png", "kernel_breakdown.png",
                "kernel_breakdown_triton-default.png"):
        assert (bench_engine_run / fig).stat().st_size > 10_000, fig
    [wandb_run] = sorted((bench_engine_run / "wandb").glob("offline-run-*/run-*.wandb"))
    media = wandb_run.parent / "files" / "media"

    def logged(folder: Path) -> set[str]:  # W&B names a file <key>_<step>_<hash>.<ext>
        return {p.name.rsplit("_", 2)[0] for p in folder.iterdir()}

    assert logged(media / "table") == {"results", "targets", "kernel_breakdown", "kernel_breakdown_triton-default"}
    assert logged(media / "images" / "figures") == {"engine_throughput", "engine_latency", "engine_offline",
                                                   "kernel_breakdown", "kernel_breakdown_triton-default"}


def test_tune_only_fills_the_cache(tmp_path: Path):
    cache = tmp_path / "cache.json"
    # The activation: inside the down projection at decode (silu_gemv), silu_mul in the prefill.
    bench_engine(tmp_path / "run", "tune.n_trials=1", "tune.only=true", "tune.families=[silu_mul,silu_gemv]",
          "tune.decode_sizes=[1]", f"tune.storage={tmp_path / 'optuna.db'}", f"config_cache={cache}",
          "logger.mode=disabled")
    tuned = pd.read_csv(tmp_path / "run" / "tuned_configs.csv")
    assert sorted(tuned["family"]) == ["silu_gemv", "silu_mul"]
    entries = json.loads(cache.read_text())["entries"]
    rows = sorted(e["shape"].get("tokens", e["shape"].get("M")) for e in entries.values())
    assert rows == [1, 18]  # decode 1 (silu_gemv); prefill = max_model_len 18 (silu_mul)
    assert (tmp_path / "run" / "results.csv").read_text().strip() == ""  # tuning only: nothing benchmarked
