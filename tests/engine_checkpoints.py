"""Tiny random-init checkpoints shared by the engine tests, written once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.checkpoint import make_checkpoint

# name -> make_checkpoint arguments. "tied_old": tied embeddings, config in the pre-transformers-5
# layout, one safetensors file. "llama3": untied, llama3 RoPE scaling, head_dim 32 (not hidden /
# heads = 16), weights in four shards with an index.
SPECS = {
    "tied_old": dict(seed=1, tie_embeddings=True, old_config_layout=True),
    "llama3": dict(seed=2, tie_embeddings=False, rope_scaling="llama3", overrides={"head_dim": 32},
                   max_shard_size="200KB"),
}
_MADE: dict[str, Path] = {}


def checkpoint(name: str, factory: pytest.TempPathFactory) -> Path:
    """The folder of checkpoint ``name`` (see SPECS), made on first use."""
    if name not in _MADE:
        _MADE[name] = make_checkpoint(factory.mktemp(name), "tiny", **SPECS[name])
    return _MADE[name]
