"""Programmatic dependent launch (kernels.device.programmatic_launch): when it is on, and that the
decode path's kernels compile with it for Hopper (no GPU needed: kernels.gpu_compile)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kernels.device import KNOWN_DEVICES, assume_device, interpreting, programmatic_launch
from tests.subprocess_env import ROOT, pythonpath


@pytest.mark.cpu_only
def test_pdl_is_off_under_the_interpreter_and_when_asked(monkeypatch):
    assert interpreting()
    with assume_device(KNOWN_DEVICES["h200"]):
        assert not programmatic_launch()  # the interpreter has no griddepcontrol, whatever the facts
    monkeypatch.setenv("WORKBENCH_PDL", "0")
    assert not programmatic_launch()


_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import kernels
    from kernels import gpu_compile
    from kernels.device import KNOWN_DEVICES, assume_device
    out = []
    with assume_device(KNOWN_DEVICES["h200"]):
        for name, shape in json.loads(sys.argv[1]):
            fam = kernels.get_family(name)
            cfg = fam.default_config(shape, "bfloat16")
            for c in gpu_compile.compile_launch(fam, shape, "bfloat16", cfg, arch=90):
                out.append([name, c.name, c.kernel.asm["ptx"].count("griddepcontrol"), bool(c.kernel.metadata.launch_pdl)])
    print(json.dumps(out))
""")


@pytest.mark.parametrize("pdl", ["1", "0"])
def test_decode_kernels_compile_with_and_without_pdl_for_hopper(pdl, tmp_path):
    """With a Hopper's facts, every kernel of a batch-1 decode step carries the wait and the
    release (griddepcontrol) and launches with PDL; with WORKBENCH_PDL=0, none does."""
    cases = [["gemm", {"M": 1, "N": 2048, "K": 2048, "b_transposed": True}],
             ["gemm", {"M": 1, "N": 40, "K": 100, "b_transposed": True}],  # no K tile divides K
             ["norm_gemv", {"M": 1, "N": 3072, "K": 2048, "residual": True}],
             ["norm_gemv", {"M": 1, "N": 3072, "K": 2048, "residual": False, "gather": True}],  # the first layer's
             ["silu_gemv", {"M": 2, "N": 2048, "K": 8192}],
             ["rope", {"tokens": 1, "heads_q": 32, "heads_kv": 8, "head_dim": 64, "block_size": 16}],
             ["attention_paged", {"batch": 1, "query_len": 1, "context_len": 2048, "heads_q": 32, "heads_kv": 8,
                                  "head_dim": 128, "block_size": 16}],
             ["attention_paged", {"batch": 1, "query_len": 1, "context_len": 1024, "heads_q": 32, "heads_kv": 8,
                                  "head_dim": 64, "block_size": 16, "rope": True}],  # the decode step's attention
             ["rmsnorm", {"tokens": 1, "hidden": 2048, "residual": True}]]
    env = {**os.environ, "TRITON_INTERPRET": "0", "WORKBENCH_KERNEL_CACHE": str(tmp_path), "WORKBENCH_PDL": pdl,
           "PYTHONPATH": pythonpath()}
    run = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases)], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    assert {c[1] for c in compiled} == {"gemm_kernel", "norm_gemv_kernel", "silu_gemv_kernel", "rope_kernel",
                                        "paged_kernel", "merge_kernel", "rmsnorm_kernel"}
    for family, kernel, instructions, launch_pdl in compiled:
        assert (instructions == 2, launch_pdl) == ((True, True) if pdl == "1" else (False, False)), (family, kernel)
