"""Shared test set-up: the device the tests run on, and the dtypes its backend computes correctly.

On a CPU-only machine the tests run through Triton's interpreter in float16 and float32 (the
interpreter computes tl.dot on bfloat16 operands wrongly). On the GPU machine, ``pytest --gpu``
runs the same tests on CUDA with bfloat16 added; tests marked ``gpu`` run only then.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Emitted kernel modules go to a per-session folder so that tests never read a stale cache.
os.environ.setdefault("WORKBENCH_KERNEL_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "wb-test-kernels"))

import kernels  # noqa: E402  (selects the interpreter before anything imports triton)
import torch  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", help="run on the CUDA GPU, bfloat16 included")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--gpu") and not torch.cuda.is_available():
        raise pytest.UsageError("--gpu given but no CUDA GPU is present")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marker = "cpu_only" if config.getoption("--gpu") else "gpu"
    default = "a CPU-only test" if marker == "cpu_only" else "needs a CUDA GPU: run with --gpu on the GPU machine"
    for item in items:
        mark = item.get_closest_marker(marker)
        if mark is not None:
            item.add_marker(pytest.mark.skip(reason=mark.kwargs.get("reason", default)))


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device kernels run on in this test session."""
    return torch.device("cuda" if pytestconfig.getoption("--gpu") else "cpu")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # `dtype` parametrises over what the backend computes correctly.
    if "dtype" in metafunc.fixturenames:
        dtypes = ["float16", "float32"]
        if metafunc.config.getoption("--gpu"):
            dtypes.append("bfloat16")
        metafunc.parametrize("dtype", dtypes)


@pytest.fixture(scope="session")
def bench_engine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one ``python -m experiments.bench_engine`` on the tiny checkpoint: every
    backend (tuned and default-config Triton, PyTorch, Hugging Face generate) on tiny workloads,
    W&B offline. It takes minutes under the interpreter, so the app's tests and plot's share it.
    CPU only: with --gpu the app picks the GPU's model, and its own run is the check."""
    from subprocess_env import bench_engine

    run = tmp_path_factory.mktemp("bench") / "run"
    bench_engine(run, "backends=[triton,triton-default,torch,hf]", "workload=tiny",
                 "workload.batch_sweep.batch_sizes=[1,3]", "workload.online.rates=[4]", "profile.decode_seqs=[1,2]",
                 f"config_cache={run.parent / 'cache.json'}")
    return run
