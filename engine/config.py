"""The model's configuration, read from a Hugging Face model folder's config.json.

Both config layouts that Llama checkpoints ship with are read:
- transformers 5: ``rope_parameters = {"rope_type", "rope_theta", "factor", ...}``;
- older: top-level ``rope_theta`` and an optional ``rope_scaling`` dict whose type key is
  ``rope_type`` (or ``type`` in the oldest files).
EOS ids come from ``generation_config.json`` when present (it may list several), else from config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (``kernels.rope.rope_inv_freq`` says what each does)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear and llama3: how much longer the context is than in pre-training
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def scaling(self) -> dict[str, Any] | None:
        """The Hugging Face rope_scaling dict of this RoPE (None for plain RoPE)."""
        if self.rope_type == "default":
            return None
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclass(frozen=True)
class ModelConfig:
    """The shapes and constants of a Llama model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    """The RoPE parameters of a config dict in either layout."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: rope_parameters/rope_scaling must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    out: dict[str, Any] = {"rope_type": rope_type, "theta": float(theta)}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ValueError(f"config.json: rope_type {rope_type!r} needs a 'factor'")
        out["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"config.json: rope_type 'llama3' needs {key!r}")
            out[key] = float(params[key])
        out["original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
        )
    return RopeConfig(**out)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json``) of a Llama model folder."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no config.json; expected a Hugging Face model folder")
    cfg = _read_json(path)
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"config.json describes model_type={cfg.get('model_type')!r} {archs}; only LlamaForCausalLM is supported"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported; Llama uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"config.json: {key}=true is not supported")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        vocab, inter, layers = int(cfg["vocab_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}") from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")

    eos = _ids(cfg.get("eos_token_id"))
    bos = cfg.get("bos_token_id")
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        eos = _ids(gen["eos_token_id"]) if "eos_token_id" in gen else eos
        bos = gen.get("bos_token_id", bos)

    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope=parse_rope(cfg),
        eos_token_ids=eos,
        bos_token_id=None if bos is None else int(bos),
    )
