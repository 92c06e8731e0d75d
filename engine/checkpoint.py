"""Random-init Llama checkpoints in Hugging Face format, with a BPE tokenizer trained on the spot.

    python -m engine.checkpoint --preset tiny --out /tmp/tiny-llama
    python -m engine.checkpoint --preset llama-3.2-1b --out /tmp/llama-1b --dtype bfloat16

Writes config.json, generation_config.json, safetensors weights (through transformers'
``LlamaForCausalLM.save_pretrained``; sharded with an index when ``--max-shard-size`` is given)
and tokenizer files that ``transformers.AutoTokenizer`` loads. Nothing is downloaded.

The initialisation keeps every sub-layer's output at unit scale (weights ~ N(0, 1/fan_in)) and
the token embedding small, so the residual stream is dominated by what attention and the MLP
compute from the context: greedy continuations vary with the prompt instead of repeating the
last token, and the top logits are separated by gaps far above float32 rounding, so a
token-for-token comparison against transformers is meaningful.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}
# The RoPE scaling each preset ships with (None: plain RoPE), as in the models they are shaped after.
PRESET_ROPE: dict[str, str | None] = {"tiny": None, "llama-3.2-1b": "llama3", "llama-3.1-8b": "llama3"}
_LLAMA3_FACTOR = {"llama-3.2-1b": 32.0, "llama-3.1-8b": 8.0}


def rope_parameters(preset: str, kind: str | None, theta: float, max_positions: int) -> dict[str, Any]:
    """The rope_parameters dict of a RoPE kind: None/"default", "linear" or "llama3".

    For the tiny preset llama3's original context is max_positions / 8, so the scaled band of
    wavelengths falls inside the short sequences the tests run.
    """
    if kind in (None, "default"):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": 2.0}
    if kind == "llama3":
        original = 8192 if preset != "tiny" else max_positions // 8
        return {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": _LLAMA3_FACTOR.get(preset, 8.0),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
    raise ValueError(f"rope scaling must be default, linear or llama3, got {kind!r}")


# --- tokenizer ------------------------------------------------------------------------------------
_WORDS = (
    "the of and to in is was for on that with as by at from his her they we you it this are be "
    "model token cache block kernel tensor batch layer head query key value attention matrix vector "
    "river mountain window garden music paper stone light water forest city market winter summer "
    "quick brown fox jumps over lazy dog small large early later always never often between under "
    "compute memory engine triton python number random seven eleven twenty hundred thousand "
    "café naïve façade über straße señor smörgåsbord año crème brûlée 東京 日本語 中文 한국어 "
    "Привет мир γειά σου 🙂 🚀 ☕ ✓ → ∑ π ≈"
).split()


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";", " ..."])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 99999)}"
        out.append(sentence)
    return out


def train_tokenizer(vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Llama 3 style: BOS prepended, EOS and end-of-turn specials),
    trained by ``tokenizers`` on a generated corpus, at most ``vocab_size`` tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


# --- weights --------------------------------------------------------------------------------------
@torch.no_grad()
def init_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Fill every parameter deterministically (see the module docstring for why this scheme)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            values = 1.0 + 0.2 * (torch.rand(p.shape, generator=gen) * 2 - 1)
        elif name == "model.embed_tokens.weight" or name == "lm_head.weight":
            values = torch.randn(p.shape, generator=gen) / hidden**0.5
        else:
            values = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
        p.copy_(values)


def _write_config_layout(path: Path, rope: dict[str, Any], old_layout: bool) -> None:
    """Rewrite config.json's RoPE fields in the transformers-5 layout or the older one."""
    cfg = json.loads(path.read_text())
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        cfg.pop(key, None)
    if old_layout:
        cfg["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        cfg["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    else:
        cfg["rope_parameters"] = rope
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    tie_embeddings: bool | None = None,
    rope_scaling: str | None = "preset",
    old_config_layout: bool = False,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-init Llama of ``preset``'s shape (fields replaced by ``overrides``) to ``out``.

    ``tie_embeddings`` None and ``rope_scaling`` "preset" keep the preset's choice. Returns ``out``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {list(PRESETS)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    fields = {**PRESETS[preset], **(overrides or {})}
    if tie_embeddings is not None:
        fields["tie_word_embeddings"] = tie_embeddings
    kind = PRESET_ROPE[preset] if rope_scaling == "preset" else rope_scaling
    rope = rope_parameters(preset, kind, fields.pop("rope_theta"), fields["max_position_embeddings"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(min(fields["vocab_size"], 4096), seed)
    if len(tokenizer) > fields["vocab_size"]:
        raise ValueError(f"vocab_size {fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    bos, eos, eot = (tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT))
    config = LlamaConfig(
        **fields,
        rope_scaling=dict(rope),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        dtype=dtype,
    )
    torch_dtype = getattr(torch, dtype)
    # Build on the meta device and materialise in the target dtype: no float32 copy of a large model.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.tie_weights()
    init_weights(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=[eos, eot])
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    _write_config_layout(out / "config.json", rope, old_config_layout)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny")
    ap.add_argument("--out", required=True, help="folder to write the checkpoint into")
    ap.add_argument("--seed", type=int, default=0)
    tie = ap.add_mutually_exclusive_group()
    tie.add_argument("--tie-embeddings", dest="tie", action="store_true", default=None)
    tie.add_argument("--untie-embeddings", dest="tie", action="store_false")
    ap.add_argument("--rope-scaling", choices=["preset", "default", "linear", "llama3"], default="preset")
    ap.add_argument("--old-config-layout", action="store_true", help="top-level rope_theta and rope_scaling")
    ap.add_argument("--max-shard-size", default=None, help='e.g. "50KB": shard the weights with an index')
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="stored dtype (default: float32 for tiny, bfloat16 otherwise)")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("float32" if args.preset == "tiny" else "bfloat16")
    out = make_checkpoint(
        args.out, args.preset, seed=args.seed, tie_embeddings=args.tie, rope_scaling=args.rope_scaling,
        old_config_layout=args.old_config_layout, max_shard_size=args.max_shard_size, dtype=dtype,
    )
    print(f"wrote {args.preset} checkpoint to {out}")


if __name__ == "__main__":
    main()
