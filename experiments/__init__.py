"""Experiment apps (Hydra): autotune sweeps, kernel and engine benchmarks, plots.

Run from the repository root, e.g. ``python -m experiments.autotune -m kernel=gemm sampler=tpe,random``.
Configs live in ``conf/``; every run writes its own folder under ``results/runs/``.
"""
