"""Which backend Triton runs on, and the facts of the device that constraints and rooflines need.

With no CUDA GPU present, Triton's interpreter (``TRITON_INTERPRET=1``) runs every kernel on the
CPU through numpy. The variable must be set before ``triton`` is first imported, so
``kernels/__init__.py`` calls :func:`select_backend` before importing any family.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch


def select_backend() -> bool:
    """Turn on Triton's interpreter when no CUDA GPU is present. Returns True when interpreting.

    A user may force either way by setting ``TRITON_INTERPRET`` themselves; we never override it.
    """
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        if "triton" in sys.modules:
            raise RuntimeError(
                "triton was imported before kernels on a machine without a GPU; import kernels first "
                "or set TRITON_INTERPRET=1 so that Triton's interpreter is used"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    return interpreting()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_device() -> torch.device:
    """CUDA when a GPU is present and Triton compiles for it, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")


@dataclass(frozen=True)
class DeviceFacts:
    """What constraints and rooflines need to know of the device a kernel runs on.

    ``peak_tflops`` (dense bf16/fp16 matrix rate) and ``peak_gbps`` (memory bandwidth) are datasheet
    leads; benchmarks measure the real ceilings in the same run and report against those.
    """

    name: str
    capability: tuple[int, int]
    num_sms: int
    smem_per_block: int  # bytes of shared memory one program may use (the opt-in maximum)
    l2_bytes: int
    peak_tflops: float
    peak_gbps: float

    @property
    def is_hopper(self) -> bool:
        return self.capability[0] == 9

    @property
    def key(self) -> str:
        """A file-name-safe name of the device, used for the per-device cache file."""
        return device_key(self.name)


def device_key(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H200" -> "nvidia_h200"."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# Datasheet leads for the cards the workbench is measured on (dense bf16, HBM).
_PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}

# Facts of cards as PyTorch reports them there (SXM parts), for compiling on a machine without them.
KNOWN_DEVICES = {
    "h100": DeviceFacts("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 50 << 20, *_PEAKS["H100"]),
    "h200": DeviceFacts("NVIDIA H200", (9, 0), 132, 232448, 60 << 20, *_PEAKS["H200"]),
}
_ASSUMED: list[DeviceFacts] = []  # the innermost assume_device block last


def known_device(key: str) -> DeviceFacts | None:
    """The facts in :data:`KNOWN_DEVICES` of the device whose :attr:`DeviceFacts.key` is ``key``, or None."""
    return next((f for f in KNOWN_DEVICES.values() if f.key == key), None)


@contextlib.contextmanager
def assume_device(facts: DeviceFacts | None) -> Iterator[DeviceFacts]:
    """Within the block :func:`device_facts` answers ``facts`` for every device, so that spaces,
    constraints and defaults are those of a GPU this machine lacks (see kernels.gpu_compile).
    ``facts`` None assumes nothing: the block sees this machine's facts."""
    if facts is None:
        yield device_facts()
        return
    _ASSUMED.append(facts)
    try:
        yield facts
    finally:
        _ASSUMED.pop()


def device_facts(device: str | torch.device | None = None) -> DeviceFacts:
    """Facts of ``device`` (default: :func:`default_device`), or those an :func:`assume_device`
    block set.

    Under the interpreter the 'device' is the CPU: its facts mimic a Hopper card (so the same
    constraints apply to the same configs) with a small program count, so persistent kernels loop.
    """
    return _ASSUMED[-1] if _ASSUMED else _probe(device)


def programmatic_launch() -> bool:
    """Whether the decode path's kernels launch with programmatic dependent launch (PDL): on a GPU of
    compute capability 9.0 or more (Hopper's ``griddepcontrol``), unless ``WORKBENCH_PDL=0``; never
    under the interpreter, which has no such instruction (even with a Hopper's facts assumed).

    Such a kernel may start while the kernel before it in the stream still runs, once all of that
    kernel's programs have passed their own wait. It loads what does not depend on its
    predecessor (a GEMV's first weight tile), then ``gdc_wait`` blocks until the predecessor has
    finished and its writes are visible; every other load and every store comes after the wait.
    Right after the wait it lets its own successor start, so at most one kernel waits ahead.
    A kernel launched without PDL (PyTorch's) is simply waited for, as usual.
    """
    return (not interpreting() and device_facts().capability[0] >= 9
            and os.environ.get("WORKBENCH_PDL", "1") != "0")


@functools.lru_cache(maxsize=None)
def _probe(device: str | torch.device | None) -> DeviceFacts:
    dev = torch.device(device) if device is not None else default_device()
    if dev.type != "cuda":
        return DeviceFacts("cpu-interpreter", (0, 0), 4, 232448, 50 << 20, 1.0, 50.0)
    props = torch.cuda.get_device_properties(dev)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 101376
    peak = next((v for k, v in _PEAKS.items() if k in props.name), (100.0, 1000.0))
    return DeviceFacts(
        props.name,
        (props.major, props.minor),
        props.multi_processor_count,
        int(smem),
        int(getattr(props, "L2_cache_size", 0)),
        *peak,
    )
