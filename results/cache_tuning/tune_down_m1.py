"""Re-tunes the batch-1 down projection GEMM of llama-3.2-1b (M=1, N=2048, K=8192, bfloat16) on the
gemm family's GEMV variant, into the device's best-config cache: its entry predated the 1-column
tiles of the GEMV space, and the down projection became a plain GEMV when the activation moved into
the gate/up GEMV (results/decode_fusion/NOTES.md). TPE, 24 trials, warm-started (the default
1-column tile and the nearest cached winners first).

Run from the repository root on the GPU: PYTHONPATH=. python3 results/cache_tuning/tune_down_m1.py
"""
import autotune

result = autotune.tune("gemm", {"M": 1, "N": 2048, "K": 8192, "b_transposed": True}, "bfloat16", n_trials=24,
                       sampler="tpe", space={"variant": ["gemv"]}, cache_path="results/cache/nvidia_h200.json",
                       storage="/tmp/optuna.db")
print({"config": result.config, "ms": result.ms, "ms_p20": result.ms_p20, "ms_p80": result.ms_p80,
       "baseline_ms": result.baseline_ms, "trials": result.n_trials})
