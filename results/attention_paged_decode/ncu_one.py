"""One launch each of the tuned paged decode and SDPA at a decode point, for Nsight Compute to profile.

    ncu --profile-from-start off --clock-control none --set full -o OUT/prof \
        python -m results.attention_paged_decode.ncu_one [--point 1] [--config JSON]

The config is the device cache's for the point unless ``--config`` gives one. Both are compiled
and warmed up first; only the launches between cudaProfilerStart and cudaProfilerStop (one of
each) are profiled, and the kernel's output is checked against the float64 reference afterwards.
"""
from __future__ import annotations

import argparse
import json

import kernels
from experiments.attention_suite import DECODE, cached_or_default
from experiments.measure import profiled_against
from kernels.device import default_device

DTYPE = "bfloat16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--point", type=int, default=1, help="index into attention_suite.DECODE")
    parser.add_argument("--config", help="a config as JSON (default: the device cache's)")
    args = parser.parse_args(argv)
    fam = kernels.get_family("attention_paged")
    shape = DECODE[args.point]
    cfg = json.loads(args.config) if args.config else cached_or_default(fam, shape, DTYPE)
    inputs = fam.make_inputs(shape, DTYPE, default_device(), seed=1)
    # The baseline's first call gathers SDPA's contiguous cache: a warm-up call, not profiled.
    err = profiled_against(fam, inputs, cfg, lambda: fam.baseline(inputs))
    print(f"{shape} {cfg}: max abs error {err:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
