"""What a worker process does with one candidate: compile, check against the reference, time.

This module runs inside the worker processes of :mod:`autotune.worker`; nothing here is called in
the tuning process itself. Each request names a family (see :mod:`autotune.families`), a shape, a
dtype and one or more configs. The inputs and the reference output of the last shape are kept, so
trials of one study reuse them; Triton's compiled kernels stay cached in the process too.

Correctness gate: the outputs are poisoned with NaN, the candidate runs, and its relative error
``||out - ref|| / ||ref||`` against the family's float32/float64 reference must not exceed the
family's tolerance for the dtype, whatever its speed. Timing: on a GPU ``triton.testing.do_bench``
(warm-up, L2 flushed before every run, CUDA events) reporting the median and the 20th/80th
percentiles; under the CPU interpreter the wall clock of a few runs (the check was the warm-up).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from autotune import families
from autotune.timing import cpu_time, do_bench_time, gpu_time
from kernels.device import default_device
from kernels.family import Family, rel_error


@dataclass(frozen=True)
class Timing:
    """How long to time: ``do_bench`` warm-up and repetition (ms) on a GPU, runs on the CPU."""

    warmup_ms: float = 10.0
    rep_ms: float = 40.0
    cpu_runs: int = 3
    graph: bool = True  # GPU: cold-L2 launches replayed in a CUDA graph (no host overhead)


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed candidate: the kind of failure, then the error's own words."""
    name = type(exc).__name__
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = " | ".join(lines[-3:])[:400] if lines else ""
    lowered = str(exc).lower()
    if "CompilationError" in name:
        kind = "compile error"
    elif name == "OutOfResources" or "out of resource" in lowered:
        kind = "out of resources"
    elif "illegal memory access" in lowered or "misaligned address" in lowered:
        kind = "illegal memory access"
    else:
        kind = "exception"
    return f"{kind}: {name}: {text}" if text else f"{kind}: {name}"


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _poison(inputs: dict) -> None:
    """Fill every floating output buffer with NaN, so an element the kernel never writes fails."""
    for t in _outputs(inputs.get("out", [])):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.fill_(float("nan"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _compile_only() -> Iterator[None]:
    """Make every Triton launch in this process a warm-up: compile (and fill Triton's disk cache)
    without running, so that compiling in a helper process leaves the GPU to the timing process."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run
    if "warmup" not in inspect.signature(original).parameters:
        yield  # an unknown Triton: fall back to compiling by running the candidate once
        return

    def run(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


class Session:
    """The state of one worker process: the device, and the inputs/reference of the last shape."""

    def __init__(self) -> None:
        self.device = default_device()
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # create the context now: start-up, not a trial, pays for it
        self._key: tuple | None = None
        self._inputs: dict = {}
        self._ref: Any = None
        self._last_error = float("nan")

    # --- requests ------------------------------------------------------------------------------
    def handle(self, msg: dict) -> dict:
        """Serve one request; failures become ``{"status": "failed", "reason": ...}`` replies.

        ``restart`` in the reply asks the parent to replace this process: after an exception on a
        GPU whose context no longer works (an illegal memory access poisons it for good).
        """
        try:
            op = msg["op"]
            if op == "evaluate":
                return self.evaluate(msg)
            if op == "compile":
                return self.compile(msg)
            if op == "confirm":
                return self.confirm(msg)
            raise ValueError(f"unknown worker request {op!r}")
        except Exception as e:  # a candidate's failure is a result, never the worker's end
            return {"status": "failed", "reason": describe(e), "restart": not self._healthy()}

    def evaluate(self, msg: dict) -> dict:
        """Check one config against the reference, then time it."""
        fam, config, timing = self._family(msg), msg["config"], Timing(**msg.get("timing", {}))
        inputs, ref = self._prepare(fam, msg)
        err = self._check(fam, inputs, ref, config, msg["dtype"])
        if err is not None:
            return err
        ms, p20, p80 = self._time(fam.timed_call(inputs, config), timing)
        return {"status": "ok", "ms": ms, "ms_p20": p20, "ms_p80": p80, "rel_error": self._last_error}

    def compile(self, msg: dict) -> dict:
        """Compile one config without running it (GPU helper processes)."""
        fam = self._family(msg)
        inputs, _ = self._prepare(fam, msg, reference=False)
        with _compile_only():
            fam.run(inputs, msg["config"])
        _sync(self.device)
        return {"status": "ok"}

    def confirm(self, msg: dict) -> dict:
        """Re-time several configs (and the family's baseline) interleaved over ``rounds`` rounds.

        Each round times every candidate once, in a rotated order, so slow drifts of clock or
        temperature hit all of them alike. A candidate's result is the median over rounds of its
        per-round medians (and likewise for the spread); one that fails is reported failed.
        """
        fam, timing, rounds = self._family(msg), Timing(**msg.get("timing", {})), int(msg.get("rounds", 5))
        inputs, ref = self._prepare(fam, msg)
        fns: list[Callable[[], Any] | None] = []
        results: list[dict] = []
        for config in msg["configs"]:
            failure = self._check(fam, inputs, ref, config, msg["dtype"])
            results.append(failure or {"status": "ok"})
            fns.append(None if failure else fam.timed_call(inputs, config))
        if msg.get("baseline") and fam.baseline(inputs) is not None:
            _sync(self.device)
            fns.append(lambda: fam.baseline(inputs))
            results.append({"status": "ok"})
        samples: list[list[tuple[float, float, float]]] = [[] for _ in fns]
        for r in range(rounds):
            for i in [(j + r) % len(fns) for j in range(len(fns))]:
                if fns[i] is None or results[i]["status"] != "ok":
                    continue
                try:
                    samples[i].append(self._time(fns[i], timing))
                except Exception as e:
                    results[i] = {"status": "failed", "reason": describe(e)}
                    if not self._healthy():
                        return {"status": "failed", "reason": describe(e), "restart": True}
        for res, s in zip(results, samples):
            if res["status"] == "ok":
                res.update(zip(("ms", "ms_p20", "ms_p80"), (float(np.median([x[j] for x in s])) for j in range(3))))
        n = len(msg["configs"])
        return {"status": "ok", "results": results[:n], "baseline": results[n] if len(results) > n else None}

    # --- helpers -------------------------------------------------------------------------------
    def _family(self, msg: dict) -> Family:
        return families.resolve(msg["family"])

    def _prepare(self, fam: Family, msg: dict, reference: bool = True) -> tuple[dict, Any]:
        """Inputs (and the reference output) of the request's shape, made once per shape."""
        key = (msg["family"], repr(sorted(msg["shape"].items())), msg["dtype"], msg.get("seed", 0))
        if key != self._key:
            self._key, self._inputs, self._ref = None, {}, None  # free the last shape's tensors first
            self._inputs = fam.make_inputs(msg["shape"], msg["dtype"], self.device, seed=msg.get("seed", 0))
            self._key = key
        if reference and self._ref is None:
            self._ref = fam.reference(self._inputs)
            _sync(self.device)
        return self._inputs, self._ref

    def _check(self, fam: Family, inputs: dict, ref: Any, config: dict, dtype: str) -> dict | None:
        """Run once on poisoned outputs and compare; a failure reply, or None when correct."""
        _poison(inputs)
        out = fam.run(inputs, config)
        _sync(self.device)
        tol = fam.tolerance(dtype, self.device)
        errors = [rel_error(o, r) for o, r in zip(_outputs(out), _outputs(ref))]
        self._last_error = max(errors)
        if not self._last_error <= tol:
            return {"status": "failed", "reason": f"wrong result: relative error {self._last_error:.3g} > tolerance {tol:.3g}"}
        return None

    def _time(self, fn: Callable[[], Any], timing: Timing) -> tuple[float, float, float]:
        """(median, 20th, 80th percentile) milliseconds of ``fn`` (see autotune/timing.py)."""
        if self.device.type != "cuda":
            return cpu_time(fn, timing.cpu_runs)
        if timing.graph:
            return gpu_time(fn)
        return do_bench_time(fn, timing.warmup_ms, timing.rep_ms)

    def _healthy(self) -> bool:
        """False when the GPU context is broken (every later CUDA call would fail too)."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            torch.zeros(1, device=self.device).item()
            return True
        except Exception:
            return False
