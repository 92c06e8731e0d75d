"""A paged, continuously batched Llama engine: ``from engine import LLM, SamplingParams``."""
from __future__ import annotations

import kernels  # noqa: F401  (selects Triton's interpreter on a CPU before anything imports triton)
from engine.llm import LLM, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
