"""Shared test set-up: the device the tests run on, and the dtypes its backend computes correctly.

On a CPU-only machine the tests run through Triton's interpreter in float16 and float32 (the
interpreter computes tl.dot on bfloat16 operands wrongly). On the GPU machine, ``pytest --gpu``
runs the same tests on CUDA with bfloat16 added; tests marked ``gpu`` run only then.
"""
from __future__ import annotations

import os

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
