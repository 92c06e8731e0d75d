"""``python -m experiments.bench_engine`` on the tiny checkpoint (CPU): every backend -- tuned and
default-config Triton, PyTorch, Hugging Face generate -- on every workload, the targets, the
per-kernel breakdown, the figures and the W&B run; and its tune-only mode."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from subprocess_env import ROOT, app_env

# With --gpu the app picks the GPU's model and workloads (Llama-3.2-1B, minutes per backend): the
# GPU measurement is that run itself, with results committed under results/.
pytestmark = pytest.mark.cpu_only(reason="the tiny-checkpoint run of CI; on the GPU, bench_engine's own run is the check")
ENGINES = ["engine-triton", "engine-triton-default", "engine-torch"]


def bench(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.bench_engine", f"hydra.run.dir={run_dir}",
           f"checkpoint_root={run_dir.parent / 'checkpoints'}", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=app_env())
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bench") / "run"
    bench(run, "backends=[triton,triton-default,torch,hf]", "workload=tiny", "workload.batch_sweep.batch_sizes=[1,3]",
          "workload.online.rates=[4]", "profile.decode_seqs=[1,2]", f"config_cache={run.parent / 'cache.json'}")
    return run


def test_every_backend_on_every_workload(run_dir: Path):
    df = pd.read_csv(run_dir / "results.csv")
    assert not (run_dir / "results_partial.csv").exists()  # only a run cut off leaves it
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


def test_targets_breakdown_figures_and_wandb(run_dir: Path):
    goals = pd.read_csv(run_dir / "targets.csv")
    assert len(goals) == 4 and np.isfinite(goals["measured"]).all()
    step1 = goals[goals["target"].str.startswith("batch-1")].iloc[0]
    assert step1["measured"] == pytest.approx(step1["step_ms"] / step1["floor_ms"])
    for stem, backend in (("kernel_breakdown", "triton/tuned"), ("kernel_breakdown_triton-default", "triton/default")):
        kb = pd.read_csv(run_dir / f"{stem}.csv")
        assert set(kb["phase"]) == {"prefill", "decode"} and (kb["backend"] == backend).all()
        assert set(kb.loc[kb["phase"] == "decode", "seqs"]) == {1, 2}  # one decode step per profiled batch size
        assert {"qkv_proj", "attention", "lm_head", "kernels", "step (eager)"} <= set(kb["operator"])
    for fig in ("engine_throughput.png", "engine_latency.png", "engine_offline.png", "kernel_breakdown.png",
                "kernel_breakdown_triton-default.png"):
        assert (run_dir / fig).stat().st_size > 10_000, fig
    [wandb_run] = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    media = wandb_run.parent / "files" / "media"

    def logged(folder: Path) -> set[str]:  # W&B names a file <key>_<step>_<hash>.<ext>
        return {p.name.rsplit("_", 2)[0] for p in folder.iterdir()}

    assert logged(media / "table") == {"results", "targets", "kernel_breakdown", "kernel_breakdown_triton-default"}
    assert logged(media / "images" / "figures") == {"engine_throughput", "engine_latency", "engine_offline",
                                                   "kernel_breakdown", "kernel_breakdown_triton-default"}


def test_tune_only_fills_the_cache(tmp_path: Path):
    cache = tmp_path / "cache.json"
    # The activation: inside the down projection at decode (silu_gemv), silu_mul in the prefill.
    bench(tmp_path / "run", "tune.n_trials=1", "tune.only=true", "tune.families=[silu_mul,silu_gemv]",
          "tune.decode_sizes=[1]", f"tune.storage={tmp_path / 'optuna.db'}", f"config_cache={cache}",
          "logger.mode=disabled")
    tuned = pd.read_csv(tmp_path / "run" / "tuned_configs.csv")
    assert sorted(tuned["family"]) == ["silu_gemv", "silu_mul"]
    entries = json.loads(cache.read_text())["entries"]
    rows = sorted(e["shape"].get("tokens", e["shape"].get("M")) for e in entries.values())
    assert rows == [1, 18]  # decode 1 (silu_gemv); prefill = max_model_len 18 (silu_mul)
    assert (tmp_path / "run" / "results.csv").read_text().strip() == ""  # tuning only: nothing benchmarked
