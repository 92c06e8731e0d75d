"""A test-only kernel family whose candidates fail in every way a real kernel can.

out[n] = 2 * x[n] in plain PyTorch, one config per behaviour (``mode``):
- ``fast``: correct; ``slow``: correct but sleeps and repeats its device work, so ``fast`` must win;
- ``wrong``: fastest of all but computes 3 * x (a wrong result must fail whatever its speed);
- ``partial``: leaves the last element unwritten (the NaN poison must catch it);
- ``raise``: raises; ``hang``: sleeps far past any limit; ``exit``: ``os._exit(3)``;
  ``signal``: kills its own process with SIGKILL;
- ``forbidden``: ruled out by :meth:`reject`; running it fails the test run loudly.

Worker processes import this module by name (``faulty_family:FAMILY``) through the tests folder,
which is on ``sys.path`` while pytest runs.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from kernels.family import Family, torch_dtype

MODES = ["fast", "slow", "wrong", "partial", "raise", "hang", "exit", "signal", "forbidden"]
FAILING = {
    "wrong": "wrong result",
    "partial": "wrong result",
    "raise": "injected failure",
    "hang": "timed out",
    "exit": "exit code 3",
    "signal": "SIGKILL",
}


class FaultyFamily(Family):
    name = "faulty"
    template_file = "none"
    template = "faulty test family: plain PyTorch, no Triton template"

    def space(self, shape, dtype):
        return {"mode": list(MODES)}

    def reject(self, shape, dtype, config):
        return "forbidden by the family's constraints" if config["mode"] == "forbidden" else None

    def default_config(self, shape, dtype):
        return {"mode": "slow"}

    def facts(self, shape, dtype, config):
        return dict(config)

    def make_inputs(self, shape, dtype, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape["n"], generator=gen).to(device=device, dtype=torch_dtype(dtype))
        return {"x": x, "out": torch.empty_like(x)}

    def shape_of(self, inputs):
        return {"n": inputs["x"].shape[0]}

    def run(self, inputs, config):
        x, out, mode = inputs["x"], inputs["out"], config["mode"]
        if mode == "forbidden":
            raise AssertionError("a rejected config was run")
        if mode == "raise":
            raise RuntimeError("injected failure")
        if mode == "hang":
            time.sleep(3600)
        if mode == "exit":
            os._exit(3)
        if mode == "signal":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "slow":
            time.sleep(0.02)  # slow by the CPU's wall clock...
            for _ in range(200):  # ...and on a GPU, where timing replays only device work (a CUDA graph)
                torch.mul(x, 2, out=out)
        if mode == "fast":
            time.sleep(0.002)
        if mode == "wrong":
            return torch.mul(x, 3, out=out)
        if mode == "partial":
            out[:-1] = 2 * x[:-1]
            return out
        return torch.mul(x, 2, out=out)

    def reference(self, inputs):
        return 2 * inputs["x"].double()

    def flops(self, shape):
        return float(shape["n"])

    def bytes(self, shape, dtype):
        return 2.0 * shape["n"] * torch.empty((), dtype=torch_dtype(dtype)).element_size()

    def tiny_shapes(self):
        return [{"n": 64}]


FAMILY = FaultyFamily()
