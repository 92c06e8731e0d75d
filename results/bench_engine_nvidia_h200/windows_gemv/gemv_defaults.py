"""The GEMV defaults of NOTES.md: each GEMV family's default config against its tuned one (the
cache results/cache/nvidia_h200.json) at the decode shapes, cold L2 in CUDA graphs. Writes OUT/defaults.json.

Run from the repository root on a GPU: PYTHONPATH=. python3 results/bench_engine_nvidia_h200/windows_gemv/gemv_defaults.py OUT
"""
import json
import sys

import kernels
from autotune import cache as acache
from autotune.timing import gpu_time

entries = json.load(open("results/cache/nvidia_h200.json"))["entries"]
rows = []
for fam_name, shapes in (
    ("gemm", [{"M": m, "N": n, "K": 2048, "b_transposed": True} for m in (1, 2, 4) for n in (2048, 128256)]),
    ("norm_gemv", [{"M": m, "N": n, "K": 2048, "residual": r} for m in (1, 2, 4) for n, r in ((3072, True), (16384, True))]),
    ("silu_gemv", [{"M": m, "N": 2048, "K": 8192} for m in (1, 2, 4)]),
):
    fam = kernels.get_family(fam_name)
    for shape in shapes:
        key = f"{fam_name}/bfloat16/{acache.shape_key(shape)}"
        tuned = entries.get(key, {}).get("config")
        inputs = fam.make_inputs(shape, "bfloat16", "cuda")
        ref = fam.reference(inputs)
        row = {"family": fam_name, "shape": shape}
        for label, cfg in (("default", fam.default_config(shape, "bfloat16")), ("tuned", tuned)):
            if cfg is None:
                continue
            out = fam.run(inputs, cfg)
            err = float((out.double() - ref).abs().max() / ref.abs().max())
            row[label] = {"config": cfg, "us": gpu_time(fam.timed_call(inputs, cfg))[0] * 1e3, "err": err}
        print(json.dumps(row), flush=True)
        rows.append(row)
json.dump(rows, open(f"{sys.argv[1]}/defaults.json", "w"), indent=1)
