"""Weights and tokenizer of a Hugging Face Llama folder.

Weights come from ``model.safetensors`` or from the shards that ``model.safetensors.index.json``
lists; each tensor is read on the CPU, converted to the engine's dtype and moved to the device
one at a time, so the peak host memory is one tensor. Q, K and V are concatenated into one QKV
projection and gate and up into one gate/up projection, so each is one GEMM per layer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.config import ModelConfig
from engine.models.llama import LayerWeights, LlamaWeights


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


class _Reader:
    """Reads named tensors from their files, checks their shapes, converts them."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype, device: torch.device) -> None:
        self.files, self.dtype, self.device = files, dtype, device
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        path = self.files[name]
        if path not in self._handles:
            if not path.is_file():
                raise ValueError(f"checkpoint shard {path.name} (holding {name!r}) is missing")
            self._handles[path] = safe_open(path, framework="pt")
        t = self._handles[path].get_tensor(name)
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}")
        return t.to(device=self.device, dtype=self.dtype)

    def fused(self, names: list[str], shapes: list[tuple[int, ...]]) -> torch.Tensor:
        return torch.cat([self.get(n, s) for n, s in zip(names, shapes)], dim=0)


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaWeights:
    """Read, check, convert and fuse every weight of the model in ``model_dir``."""
    reader = _Reader(_weight_files(Path(model_dir)), dtype, device)
    c = config
    H, V, I = c.hidden_size, c.vocab_size, c.intermediate_size
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        layers.append(
            LayerWeights(
                input_norm=reader.get(p + "input_layernorm.weight", (H,)),
                qkv=reader.fused(
                    [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"],
                    [(c.q_size, H), (c.kv_size, H), (c.kv_size, H)],
                ),
                o=reader.get(attn + "o_proj.weight", (H, c.q_size)),
                post_norm=reader.get(p + "post_attention_layernorm.weight", (H,)),
                gate_up=reader.fused([mlp + "gate_proj.weight", mlp + "up_proj.weight"], [(I, H), (I, H)]),
                down=reader.get(mlp + "down_proj.weight", (H, I)),
            )
        )
    embed = reader.get("model.embed_tokens.weight", (V, H))
    if c.tie_word_embeddings:
        lm_head = embed
    elif "lm_head.weight" in reader:
        lm_head = reader.get("lm_head.weight", (V, H))
    else:
        raise ValueError("checkpoint lacks 'lm_head.weight' and config.json does not tie the word embeddings")
    return LlamaWeights(embed=embed, layers=layers, norm=reader.get("model.norm.weight", (H,)), lm_head=lm_head)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer through ``transformers.AutoTokenizer`` (local files only)."""
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
