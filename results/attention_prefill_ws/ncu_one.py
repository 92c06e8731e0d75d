"""One launch each of a prefill config and SDPA's cuDNN backend, for Nsight Compute to profile.

    ncu --profile-from-start off --clock-control none --set full -o OUT/prof \
        python -m results.attention_prefill_ws.ncu_one [--point 0] [--config JSON] [--template PATH]

Compiles and warms both up first; only the launches between cudaProfilerStart and
cudaProfilerStop (one of each, the kernel's output checked against the float64 reference
afterwards) are profiled. ``--template`` stands in for the ws template as in ab.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import kernels
from experiments.attention_suite import PREFILL, _backend
from experiments.measure import profiled_against
from kernels.device import default_device
from experiments.template_ab import template_override
from results.attention_prefill_ws.ab import BASE, WS_FILE

DTYPE = "bfloat16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--point", type=int, default=0, help="index into attention_suite.PREFILL")
    parser.add_argument("--config", default="{}", help="JSON overrides of " + json.dumps(BASE))
    parser.add_argument("--template", help="a revision of attention_prefill_ws.py.j2")
    args = parser.parse_args(argv)
    fam = kernels.get_family("attention_prefill")
    shape = PREFILL[args.point]
    cfg = {**BASE, **json.loads(args.config)}
    inputs = fam.make_inputs(shape, DTYPE, default_device(), seed=1)

    def cudnn() -> object:
        with _backend("CUDNN_ATTENTION"):
            return fam.baseline(inputs)

    revision = Path(args.template).read_text() if args.template else None
    with template_override(fam.name, WS_FILE, revision) if revision else contextlib.nullcontext():
        err = profiled_against(fam, inputs, cfg, cudnn)
    print(f"{shape} {cfg}: max abs error {err:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
