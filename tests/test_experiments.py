"""The experiment apps end to end (subprocesses, CPU defaults, tiny trial counts) and their helpers.

Each app runs from the repository root into a temporary run folder and must leave its results.csv,
its figures and (unless logger.mode=disabled) a W&B offline run there. With logger.mode=disabled a
stub ``wandb`` that raises on import sits first on the path: importing wandb at all fails the run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

import autotune
import kernels
import torch
from experiments import plots
from experiments.measure import Ceilings
from experiments.shapes import model_shapes, shape_set
from experiments.table import add_speedups, collate, kernel_row
from subprocess_env import ROOT, app_env, pythonpath

CONF = ROOT / "conf"


def run_app(app: str, run_dir: Path, *overrides: str, env: dict | None = None, multirun: bool = False,
            cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m experiments.<app>`` (from the repository root unless ``cwd``), its run (or sweep) folder ``run_dir``."""
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    cmd = [sys.executable, "-m", f"experiments.{app}", *(["-m"] if multirun else []), where, *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**app_env(), **(env or {})})


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return done


def wandb_offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture
def no_wandb(tmp_path: Path) -> dict:
    """An environment in which ``import wandb`` raises."""
    stub = tmp_path / "stub" / "wandb"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('wandb imported although logger.mode=disabled')\n")
    return {"PYTHONPATH": pythonpath(stub.parent)}


# --- shape sets -------------------------------------------------------------------------------------


def _model_set(name: str) -> dict[str, list[dict]]:
    node = OmegaConf.load(CONF / "shapes" / f"{name}.yaml")
    model = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    return model_shapes(model, list(node.decode_batch_sizes), list(node.prefill_tokens), list(node.prompt_lens),
                        list(node.context_lens), int(node.block_size))


def test_llama_1b_gemm_shapes_follow_the_model_dims() -> None:
    gemm = _model_set("llama-3.2-1b")["gemm"]
    nk = {(s["N"], s["K"]) for s in gemm}
    # QKV (32 + 2 x 8 heads of 64), output, gate/up (2 x 8192), down, LM head (vocab 128256).
    assert nk == {(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)}
    # Batch-1 decode runs QKV, gate/up and down inside norm_gemv and silu_gemv; the output projection stays.
    assert {s["M"] for s in gemm if s["N"] == 3072} == {16, 64, 256, 2048}
    assert {s["M"] for s in gemm if (s["N"], s["K"]) == (2048, 2048)} == {1, 16, 64, 256, 2048}
    fused = _model_set("llama-3.2-1b")
    assert {(s["M"], s["N"], s["residual"]) for s in fused["norm_gemv"]} == {(1, 3072, False), (1, 3072, True),
                                                                            (1, 16384, True)}
    assert fused["silu_gemv"] == [{"M": 1, "N": 2048, "K": 8192}]
    assert {s["tokens"] for s in fused["silu_mul"]} == {16, 64, 256, 2048}
    # The LM head runs once per sequence: decode batches and the 2048-token prefill's 16, 4 and 1 prompts.
    assert {s["M"] for s in gemm if s["N"] == 128256} == {1, 4, 16, 64, 256}
    assert len({json.dumps(s, sort_keys=True) for s in gemm}) == len(gemm)


def test_llama_8b_attention_shapes() -> None:
    shapes = _model_set("llama-3.1-8b")
    assert {(s["batch"], s["seqlen"]) for s in shapes["attention_prefill"]} == {(16, 128), (4, 512), (1, 2048)}
    assert all(s["heads_q"] == 32 and s["heads_kv"] == 8 and s["head_dim"] == 128 for s in shapes["attention_prefill"])
    decode = [s for s in shapes["attention_paged"] if s["query_len"] == 1]
    assert len(decode) == 4 * 3 and {s["context_len"] for s in decode} == {512, 2048, 8192}


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_derived_shapes_are_valid_for_every_registered_family(name: str) -> None:
    for family, shapes in _model_set(name).items():
        if family not in kernels.family_names():
            continue
        fam = kernels.get_family(family)
        for shape in shapes:
            assert fam.space(shape, "bfloat16"), (family, shape)
            assert fam.bytes(shape, "bfloat16") > 0


def test_shape_set_sources_and_errors() -> None:
    gemm = kernels.get_family("gemm")
    tiny = OmegaConf.load(CONF / "shapes" / "tiny.yaml")
    assert shape_set(tiny, gemm) == gemm.tiny_shapes()
    tiny.limit = 2
    assert shape_set(tiny, gemm) == gemm.tiny_shapes()[:2]
    custom = OmegaConf.load(CONF / "shapes" / "custom.yaml")
    custom.list = {"gemm": [{"M": 8, "N": 8, "K": 8}]}
    assert shape_set(custom, gemm) == [{"M": 8, "N": 8, "K": 8}]
    with pytest.raises(ValueError, match="lists no shapes for family 'rmsnorm'"):
        shape_set(custom, kernels.get_family("rmsnorm"))


# --- table and figures --------------------------------------------------------------------------------


def test_roofline_fraction_and_speedup() -> None:
    gemm = kernels.get_family("gemm")
    shape = {"M": 64, "N": 64, "K": 64}
    ceil = Ceilings(tflops=1.0, gbps=10.0)
    roof_ms = max(gemm.flops(shape) / 1e9, gemm.bytes(shape, "float32") / 1e7)
    env = {"date": "d", "device": "x", "torch": "t", "triton": "tr"}
    rows = [kernel_row(env, gemm, shape, "float32", "default", None, roof_ms * 2, 0.0, ceil, "tflops"),
            kernel_row(env, gemm, shape, "float32", "torch", None, roof_ms * 4, 0.0, ceil, "tflops")]
    add_speedups(rows, ["torch"])
    assert rows[0]["roofline_frac"] == pytest.approx(0.5)
    assert rows[0]["speedup"] == pytest.approx(2.0) and rows[0]["baseline"] == "torch"
    assert rows[0]["tflops"] == pytest.approx(gemm.flops(shape) / (roof_ms * 2) / 1e9)


def test_figures_from_a_table(tmp_path: Path) -> None:
    gemm = kernels.get_family("gemm")
    env = {"date": "2026-01-01", "device": "dev", "torch": "t", "triton": "tr"}
    ceil = Ceilings(1.0, 10.0)
    rows = []
    for shape in gemm.tiny_shapes()[:2]:
        for sampler in ("tpe", "random"):
            for trial, ms in enumerate([3.0, math.nan, 2.0, 2.5]):
                rows.append(kernel_row(env, gemm, shape, "float32", "trial", {"variant": "tiled"}, ms, 0.1, ceil,
                                       "tflops", sampler=sampler, seed=0, trial=trial))
        rows.append(kernel_row(env, gemm, shape, "float32", "tuned", None, 2.0, 0.1, ceil, "tflops", sampler="tpe"))
        rows.append(kernel_row(env, gemm, shape, "float32", "torch", None, 1.0, 0.1, ceil, "tflops", sampler=None))
    engine = [{**env, "impl": impl, "workload": "batch_sweep", "batch": b, "tokens_per_s": b * k, "step_ms": 1.0 + b}
              for impl, k in (("hf", 1.0), ("engine-triton", 3.0)) for b in (1, 2, 4)]
    online = [{**env, "impl": "engine-triton", "workload": "online", "rate": r, "ttft_p50_ms": r, "ttft_p99_ms": 2 * r,
               "tpot_p50_ms": 1.0, "tpot_p99_ms": 2.0} for r in (1, 4)]
    df = pd.concat([pd.DataFrame(rows), pd.DataFrame(engine + online)], ignore_index=True)
    drawn = plots.draw_all(df, tmp_path)
    assert [p.name for p in drawn] == ["convergence.png", "throughput.png", "roofline.png",
                                        "engine_throughput.png", "engine_latency.png"]
    assert all(p.stat().st_size > 10_000 for p in drawn)
    # A table of engine rows only draws only the engine's figures.
    assert [p.name for p in plots.draw_all(pd.DataFrame(engine), tmp_path / "e")] == ["engine_throughput.png"]


def test_collate_tags_rows_with_their_run(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        pd.DataFrame({"impl": ["x"], "ms": [float(i)]}).to_csv(tmp_path / str(i) / "results.csv", index=False)
    df = collate([tmp_path])
    assert sorted(df["run"]) == [str(tmp_path / "0"), str(tmp_path / "1")]
    with pytest.raises(FileNotFoundError, match="no such results file or folder"):
        collate([tmp_path / "0" / "nothing-here"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no results.csv under"):
        collate([tmp_path / "empty"])


# --- the apps ------------------------------------------------------------------------------------------

KERNEL_COLUMNS = {"date", "device", "torch", "triton", "family", "impl", "variant", "dtype", "shape", "config", "ms",
                  "spread_ms", "tflops", "gbps", "intensity", "roofline_frac", "baseline", "baseline_ms", "speedup"}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One autotune run (gemm, first tiny shape, 2 trials, W&B offline) shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("autotune")
    ok(run_app("autotune", run_dir, "kernel=gemm", "shapes=tiny", "shapes.limit=1", "n_trials=2", "sampler=random",
               f"cache_path={run_dir / 'cache.json'}"))
    return run_dir


def test_autotune_app_writes_table_figures_cache_and_wandb(tuned: Path) -> None:
    df = pd.read_csv(tuned / "results.csv")
    assert KERNEL_COLUMNS <= set(df.columns)
    trials = df[df["impl"] == "trial"]
    assert list(trials["trial"]) == [1, 2] and set(trials["sampler"]) == {"random"}
    winner = df[df["impl"] == "tuned"].iloc[0]
    assert json.loads(winner["shape"]) == kernels.get_family("gemm").tiny_shapes()[0]
    assert winner["ms"] > 0 and winner["config"] in set(trials.loc[trials["state"] == "ok", "config"])
    entry = autotune.lookup("gemm", json.loads(winner["shape"]), winner["dtype"], cache_path=tuned / "cache.json",
                            nearest=False)
    assert entry["config"] == json.loads(winner["config"]) and entry["sampler"] == "random"
    for fig in ("convergence.png", "throughput.png", "roofline.png"):
        assert (tuned / fig).stat().st_size > 10_000, fig
    assert (tuned / ".hydra" / "config.yaml").is_file()
    [wandb_run] = wandb_offline_runs(tuned)
    media = wandb_run.parent / "files" / "media"
    assert len(list(media.glob("table/results_*.table.json"))) == 1
    assert {p.name.split("_")[0] for p in media.glob("images/figures/*.png")} == {"convergence", "throughput", "roofline"}
    record = wandb_run.read_bytes()  # the run's protobuf log: per-trial metrics and the cache artifact
    assert b"trial/best_ms" in record and b"autotune-cache" in record


@pytest.mark.cpu_only(reason="the CPU's defaults")
def test_bench_engine_defaults_on_the_cpu() -> None:
    """The app's composed default config on a CPU-only machine: the tiny checkpoint, its workloads
    and the backends the app runs. (The app's own run, over every backend, is
    tests/test_engine_bench.py's.)"""
    from hydra import compose, initialize_config_dir

    from experiments.context import pick  # registers the by_device resolver

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="bench_engine")
    assert list(cfg.backends) == ["triton", "torch", "hf"] and cfg.dtype == "float32"
    assert pick(cfg.model, "cpu").name == "tiny"
    assert list(pick(cfg.workload, "cpu").batch_sweep.batch_sizes) == [1, 2, 4]
    assert cfg.logger.mode == "offline"


def test_bench_kernels_app_uses_the_tuned_cache(tuned: Path, tmp_path: Path) -> None:
    done = ok(run_app("bench_kernels", tmp_path, "kernel=gemm", "shapes=tiny", "shapes.limit=2", "nearest=false",
                      f"cache_path={tuned / 'cache.json'}"))
    df = pd.read_csv(tmp_path / "results.csv")
    assert KERNEL_COLUMNS <= set(df.columns)
    assert sorted(df["impl"]) == sorted(["tuned", "default", "torch"] * 2)
    assert (df["state"] == "ok").all() and (df["rel_error"] < 1e-4).all()
    tuned_rows = df[df["impl"] == "tuned"]
    assert list(tuned_rows["config_source"]) == ["exact", "default"]  # only the first shape was tuned
    assert (df["speedup"] > 0).all() and (df.loc[df["impl"] == "torch", "speedup"] == 1).all()
    for fig in ("throughput.png", "roofline.png"):
        assert (tmp_path / fig).is_file()
    assert len(wandb_offline_runs(tmp_path)) == 1 and "wandb sync" in done.stdout


@pytest.mark.cpu_only(reason="collates the CPU run of bench_engine (bench_engine_run)")
def test_multirun_over_samplers_without_wandb_then_plot_collates(tmp_path: Path, no_wandb: dict,
                                                                   bench_engine_run: Path) -> None:
    sweep = tmp_path / "results" / "runs" / "autotune" / "multirun_1"
    ok(run_app("autotune", sweep, "sampler=tpe,random", "shapes=tiny", "shapes.limit=1", "n_trials=2",
               "logger.mode=disabled", f"cache_path={tmp_path / 'cache.json'}", env=no_wandb, multirun=True))
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not list(sweep.rglob("wandb"))
    # No runs given: the newest multirun under ./results/runs, collated.
    ok(run_app("plot", tmp_path / "plot_newest", env=no_wandb, cwd=tmp_path))
    df = pd.read_csv(tmp_path / "plot_newest" / "results.csv")
    assert set(df.loc[df["impl"] == "trial", "sampler"]) == {"tpe", "random"} and df["run"].nunique() == 2
    assert (tmp_path / "plot_newest" / "convergence.png").is_file()
    # Runs given: folders and CSV files, kernel and engine tables together.
    plot_dir = tmp_path / "plot"
    done = ok(run_app("plot", plot_dir, f"runs=[{sweep},{bench_engine_run / 'results.csv'}]", env=no_wandb))
    df = pd.read_csv(plot_dir / "results.csv")
    assert df["run"].nunique() == 3 and (df["workload"] == "batch_sweep").any()
    for fig in ("convergence.png", "throughput.png", "roofline.png", "engine_throughput.png"):
        assert (plot_dir / fig).is_file(), done.stdout


@pytest.mark.parametrize("override,needle", [
    ("kernel=nope", "kernel/nope"),
    ("sampler=nope", "sampler/nope"),
    ("shapes=nope", "shapes/nope"),
    ("n_trials=[1,", "no viable alternative at input '[1,'"),
])
def test_unknown_names_and_malformed_overrides_fail(tmp_path: Path, override: str, needle: str) -> None:
    done = run_app("autotune", tmp_path, override, "logger.mode=disabled")
    assert done.returncode != 0
    assert needle in done.stderr


@pytest.mark.parametrize("app,override,needle", [
    ("autotune", "device=cuda", "no CUDA GPU"),
    ("autotune", "dtype=bfloat16", "dtype=bfloat16 needs a GPU"),
    ("bench_kernels", "baselines=[cublas]", "need a CUDA GPU"),
    ("autotune", "logger.mode=sometimes", "logger.mode='sometimes'"),
])
@pytest.mark.skipif(torch.cuda.is_available(), reason="the messages of a CPU-only machine")
def test_gpu_only_options_on_the_cpu_fail_clearly(tmp_path: Path, app: str, override: str, needle: str) -> None:
    done = run_app(app, tmp_path, override, "shapes=tiny", "shapes.limit=1")
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_wandb_online_without_a_login_fails_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "experiments.bench_kernels", f"hydra.run.dir={tmp_path / 'run'}", "logger.mode=online",
           "shapes=tiny", "shapes.limit=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "W&B online run could not start" in done.stderr and "Traceback" not in done.stderr
