"""The engine's data-plane pieces on their own: the reference paged attention against dense
attention, the sampler's distributions, incremental detokenisation, config parsing."""
from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoint import train_tokenizer
from engine.config import RopeConfig, load_config, parse_rope
from engine.detokenizer import IncrementalDetokenizer
from engine.ops.paged_attention_torch import paged_attention
from engine.sampler import Sampler, greedy_argmax


# --- paged attention --------------------------------------------------------------------------------
def _dense_causal(q, k, v, q_start, scale):
    """q [n, Hq, D] at positions q_start.., k and v [L, Hkv, D]: float64 softmax attention."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    qpos = torch.arange(q_start, q_start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_paged_attention_matches_dense():
    """Chunked prefill, full prefill and decode in one batch, blocks scattered over the cache."""
    torch.manual_seed(0)
    Hq, Hkv, D, bs, num_blocks = 6, 2, 16, 4, 40
    context = [9, 1, 14, 5]  # tokens in the cache per sequence, new ones included
    q_lens = [3, 1, 14, 1]  # a prefill chunk, decode, a whole prompt, decode
    k_cache = torch.randn(num_blocks, bs, Hkv, D)
    v_cache = torch.randn(num_blocks, bs, Hkv, D)
    perm = torch.randperm(num_blocks).tolist()
    tables = []
    for c in context:
        n = -(-c // bs)
        tables.append(perm[:n] + [0] * (4 - n))
        perm = perm[n:]
    q = torch.randn(sum(q_lens), Hq, D)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = paged_attention(q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), cu,
                          torch.tensor(context, dtype=torch.int32), max(q_lens), sm_scale=0.3)
    for b, (c, n) in enumerate(zip(context, q_lens)):
        slots = [tables[b][p // bs] * bs + p % bs for p in range(c)]
        k = k_cache.reshape(-1, Hkv, D)[slots]
        v = v_cache.reshape(-1, Hkv, D)[slots]
        ref = _dense_causal(q[cu[b]:cu[b + 1]], k, v, c - n, 0.3)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), ref, rtol=1e-5, atol=1e-5)


# --- sampler ----------------------------------------------------------------------------------------
def _sample(sampler, logits, temperature=1.0, top_k=0, top_p=1.0, generators=None):
    B = logits.shape[0]
    return sampler.sample(
        logits,
        torch.full((B,), float(temperature)),
        torch.full((B,), top_k, dtype=torch.int64),
        torch.full((B,), float(top_p)),
        generators if generators is not None else [None] * B,
    )


@pytest.mark.parametrize("vocab", [128256, 32000, 4096 + 8, 1000])
def test_greedy_argmax_is_argmax_with_its_tie_break(vocab):
    """The two-pass argmax equals torch.argmax, the first of equal maxima included: ties planted in
    one chunk, across chunks and at the row's ends; vocabularies with 256, 256, 8 (argmax itself)
    and 8 chunks."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g).to(torch.bfloat16).float()  # bfloat16 rounding: natural ties
    top = logits.max() + 1
    logits[1, [vocab - 1, 3]] = top  # across chunks: the earlier wins
    logits[2, [7, 8]] = top  # within one chunk
    logits[3, [0, vocab // 2]] = top
    logits[4] = 0.0  # every entry equal
    want = logits.argmax(dim=-1)
    assert torch.equal(greedy_argmax(logits), want)
    assert torch.equal(greedy_argmax(logits[:1]), want[:1])
    out = torch.full((5,), -1, dtype=torch.int64)
    assert greedy_argmax(logits, out=out) is out and torch.equal(out, want)


def test_sampler_greedy_and_truncation():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    assert torch.equal(_sample(sampler, logits, temperature=0.0), best)
    assert torch.equal(_sample(sampler, logits, top_k=1), best)
    assert torch.equal(_sample(sampler, logits, top_p=1e-6), best)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        tok = _sample(sampler, logits, temperature=2.0, top_k=3)
        assert (top3 == tok[:, None]).any(-1).all()


def test_sampler_distribution():
    """Temperature, top-k and top-p frequencies over many rows match the truncated softmax."""
    sampler = Sampler(torch.device("cpu"))
    base = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    n = 40000
    logits = base.repeat(n, 1)
    cases = [
        (0.7, 0, 1.0, torch.softmax(base / 0.7, -1)),
        (1.0, 3, 1.0, torch.softmax(torch.tensor([2.0, 1.5, 1.0, -1e9, -1e9]), -1)),
    ]
    p = torch.softmax(base, -1)  # 0.46, 0.28, 0.17, ...: top_p 0.7 keeps the first two (0.46 < 0.7)
    cases.append((1.0, 0, 0.7, torch.tensor([p[0], p[1], 0, 0, 0]) / (p[0] + p[1])))
    for temperature, top_k, top_p, expected in cases:
        tok = _sample(sampler, logits, temperature, top_k, top_p)
        freq = torch.bincount(tok, minlength=5).double() / n
        # 4.5 standard deviations of a binomial frequency: a wrong distribution fails, noise does not.
        bound = 4.5 * (expected.double() * (1 - expected.double()) / n).sqrt() + 1e-9
        assert ((freq - expected.double()).abs() <= bound).all(), (temperature, top_k, top_p, freq, expected)


def test_sampler_seeded_rows_ignore_neighbours():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    g = sampler.request_generator(7)
    alone = [int(_sample(sampler, logits[2:3], generators=[g])[0]) for _ in range(8)]
    gens = [None, None, sampler.request_generator(7), sampler.request_generator(8), None, None]
    together = [int(_sample(sampler, logits, generators=gens)[2]) for _ in range(8)]
    assert together == alone
    assert len(set(alone)) > 1, "the seeded row should vary from step to step"


# --- detokenizer ------------------------------------------------------------------------------------
def test_incremental_detokenizer_keeps_characters_whole():
    tok = train_tokenizer(400)
    text = "Café 日本語 🙂 crème brûlée → π ≈ 3"
    ids = tok(text).input_ids
    pieces = [tok.decode([i]) for i in ids[1:]]
    assert any("\ufffd" in p for p in pieces), "the test needs a character split over several tokens"
    detok = IncrementalDetokenizer(tok, ids[:1])
    deltas = [detok.add(i) for i in ids[1:]]
    detok.flush()
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == text


# --- config -----------------------------------------------------------------------------------------
def _write(tmp_path, cfg, gen=None):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return tmp_path


BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "eos_token_id": 5}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}


def test_config_layouts_agree(tmp_path):
    new = parse_rope({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 5e5}})
    old = parse_rope({**BASE, "rope_theta": 5e5, "rope_scaling": LLAMA3})
    typed = {**{k: v for k, v in LLAMA3.items() if k != "rope_type"}, "type": "llama3"}  # the oldest files
    oldest = parse_rope({**BASE, "rope_theta": 5e5, "rope_scaling": typed})
    assert new == old == oldest == RopeConfig("llama3", 5e5, 8.0, 1.0, 4.0, 1024)
    assert parse_rope({**BASE, "rope_theta": 123.0, "rope_scaling": None}) == RopeConfig("default", 123.0)
    assert parse_rope({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}}).factor == 2.0
    cfg = load_config(_write(tmp_path, {**BASE, "head_dim": 32}, {"eos_token_id": [5, 9], "bos_token_id": 1}))
    assert cfg.head_dim == 32 and cfg.eos_token_ids == (5, 9) and cfg.bos_token_id == 1 and cfg.num_kv_heads == 2


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"model_type": "mistral"}, "only LlamaForCausalLM"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_config_rejects_unsupported(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, {**BASE, **change}))
