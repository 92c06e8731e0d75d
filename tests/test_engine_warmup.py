"""The engine's warm-up (CPU, float32, Triton interpreter): the shape set it resolves is exactly what
the served steps launch, tuning it writes configs the engine then launches with, and bad settings
are refused with a message naming them."""
from __future__ import annotations

import json

import pytest
import torch

import autotune
from engine import LLM, SamplingParams
from engine.cuda_graphs import batch_buckets, context_buckets
from engine.ops.triton_ops import FAMILIES
from engine_checkpoints import checkpoint
from kernels.family import dtype_name

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return checkpoint("llama3", tmp_path_factory)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 96, 100]
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, *range(64, 257, 32)]


def test_context_buckets():
    assert context_buckets(2048) == [256, 512, 1024, 2048]
    assert context_buckets(2049) == [512, 1024, 2048, 2049]  # at most 4: the longest kept
    assert context_buckets(300) == [256, 300]
    assert context_buckets(256) == [256]
    assert context_buckets(160) == [160]
    assert context_buckets(1) == [1]
    assert context_buckets(131072) == [16384, 32768, 65536, 131072]
    for bad in (0, -5, 2.0, True, "512"):
        with pytest.raises(ValueError, match="max_context_len must be a positive int"):
            context_buckets(bad)


def test_decode_steps_launch_attention_at_the_context_bucket_that_holds_their_window(model_dir):
    """A decode step's attention is launched with the smallest context bucket that holds every
    context its window reaches (its graph's config): 256 while a window ends within 256 tokens, then
    max_model_len (400). The warm-up lists both buckets' attention shapes."""
    llm = LLM(model_dir, kernels="torch", block_size=16, num_kv_blocks=30, max_num_seqs=2, max_model_len=400,
              max_num_batched_tokens=256, num_decode_steps=8)
    llm.runner.capture_decode_graphs([1, 2], llm.max_model_len, capture=False, window_steps=8)
    assert llm.runner.graphs.contexts == [256, 400]
    launches = []  # (max_context_len the attention was launched with, the step's longest context)
    real = llm.runner.model.ops.rope_attention

    def recording(q, k, v, positions, cos_sin, k_cache, v_cache, meta, sm_scale):
        if meta.max_seqlen_q == 1:
            launches.append((meta.max_context_len, int(meta.context_lens.max())))
        return real(q, k, v, positions, cos_sin, k_cache, v_cache, meta, sm_scale)

    llm.runner.model.ops.rope_attention = recording
    prompt = torch.randint(3, 200, (240,), generator=torch.Generator().manual_seed(0)).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert len(out[0].token_ids) == 40
    assert {cap for cap, _ in launches} == {256, 400}
    for cap, longest in launches:
        assert longest <= cap
        if longest <= 256 - 8:  # a window of at most 8 steps from here ends within 256 tokens
            assert cap == 256, launches
        if longest > 256:
            assert cap == 400, launches

    triton = LLM(model_dir, block_size=16, num_kv_blocks=30, max_num_seqs=2, max_model_len=400,
                 max_num_batched_tokens=256)
    attn = {r["shape"]["context_len"] for r in triton.resolved_configs
            if r["family"] == "attention_paged" and r["step"] == "decode"}
    assert attn == {256, 512}  # the buckets 256 and 400, as the family buckets a context (powers of two)


def test_warmup_resolves_every_shape_the_decode_steps_launch(model_dir, tmp_path):
    cache = tmp_path / "cache.json"  # empty: every config is the family default
    llm = LLM(model_dir, block_size=4, num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=16,
              config_cache=cache)
    rows = llm.resolved_configs
    assert {r["family"] for r in rows} == set(FAMILIES) and {r["source"] for r in rows} == {"default"}
    assert {(r["step"], r["seqs"]) for r in rows} == {("decode", 1), ("decode", 2), ("decode", 4), ("prefill", 1)}
    c = llm.config
    def decode_mn(family: str) -> set[tuple[int, int]]:
        return {(r["shape"]["M"], r["shape"]["N"]) for r in rows if r["family"] == family and r["step"] == "decode"}

    for b in (1, 2, 4):  # at M = batch: the output projection and the LM head on gemm; QKV and gate/up
        # with the norm before them on norm_gemv, down with the activation on silu_gemv (a decode
        # batch is at most 4 rows here)
        assert {(b, c.hidden_size), (b, c.vocab_size)} <= decode_mn("gemm")
        assert {(b, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim), (b, 2 * c.intermediate_size)} <= decode_mn("norm_gemv")
        assert (b, c.hidden_size) in decode_mn("silu_gemv")  # the down projection, its activation fused
    attn = [r["shape"] for r in rows if r["family"] == "attention_paged" and r["step"] == "decode"]
    assert {a["context_len"] for a in attn} == {256} and {a["query_len"] for a in attn} == {1}  # max_model_len 160
    prefill = [r["shape"] for r in rows if r["family"] == "gemm" and r["step"] == "prefill"]
    assert {s["M"] for s in prefill} == {16, 1}  # 16 tokens through the projections, 1 row of logits

    # Steps of one token per sequence (prompts of one token) all run padded to a bucket: every shape
    # they launch was resolved by the warm-up, so serving resolves nothing new.
    dispatchers = [autotune.tuned(f, cache_path=cache) for f in FAMILIES]
    before = [set(d.sources) for d in dispatchers]
    llm.runner.capture_decode_graphs(batch_buckets(4), llm.max_model_len, capture=False)
    outs = llm.generate([[5], [9], [300]], GREEDY, use_tqdm=False)
    assert all(len(o.token_ids) == 4 for o in outs)
    assert [set(d.sources) for d in dispatchers] == before


def test_warmup_tunes_the_shape_set(model_dir, tmp_path):
    cache, storage = tmp_path / "cache.json", tmp_path / "optuna.db"
    llm = LLM(model_dir, block_size=4, num_kv_blocks=40, max_num_seqs=2, max_num_batched_tokens=8,
              config_cache=cache)
    # The activation: silu_mul in the 8-token prefill, inside the down projection (silu_gemv) at decode.
    families = ["silu_mul", "silu_gemv"]
    rows = llm.warmup(tune_trials=1, families=families, decode_sizes=[1], prefill_sizes=[8], storage=storage)
    tuned = llm.tuned_configs
    assert sorted((t["family"], t["shape"].get("tokens", t["shape"].get("M"))) for t in tuned) == [
        ("silu_gemv", 1), ("silu_mul", 8)]
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 2
    for t in tuned:
        [row] = [r for r in rows if r["family"] == t["family"] and r["shape"] == t["shape"]]
        assert row["source"] == "exact" and row["config"] == t["config"]
    assert {r["source"] for r in rows if r["family"] not in families} == {"default"}
    # The engine launches with the tuned configs and still computes the same tokens.
    reference = LLM(model_dir, kernels="torch", block_size=4, num_kv_blocks=40)
    prompts = [[7, 8, 9, 10, 11, 12, 13, 14], [40, 41, 42]]
    want = [o.token_ids for o in reference.generate(prompts, GREEDY, use_tqdm=False)]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kernel_configs="best"), ValueError, "kernel_configs must be one of"),
        (dict(max_model_len=100_000), ValueError, "max_model_len=100000 exceeds"),
        (dict(max_model_len=0), ValueError, "max_model_len must be >= 1"),
        (dict(tune_trials=-1), ValueError, "tune_trials must be >= 0"),
        (dict(tune_trials=2.0), TypeError, "tune_trials must be an int"),
    ],
)
def test_bad_engine_settings(model_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        LLM(model_dir, num_kv_blocks=8, **kwargs)


def test_bad_warmup_calls_and_long_prompts(model_dir):
    llm = LLM(model_dir, block_size=4, num_kv_blocks=40, max_num_seqs=2, max_model_len=12)
    assert llm.max_model_len == 12
    with pytest.raises(ValueError, match="decode_sizes must be ints in 1..2"):
        llm.warmup(decode_sizes=[3])
    with pytest.raises(ValueError, match="prefill_sizes must be ints in 1..12"):
        llm.warmup(prefill_sizes=[0])
    with pytest.raises(ValueError, match="request 0: prompt has 13 tokens, more than max_model_len=12"):
        llm.generate([list(range(1, 14))], use_tqdm=False)
    llm.add_request([1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="requests are running"):
        llm.warmup()
    llm.abort_all()
    torch_llm = LLM(model_dir, kernels="torch", num_kv_blocks=8)
    assert torch_llm.warmup(tune_trials=1) == [] and not torch_llm.uses_cuda_graphs


def test_compile_plan_covers_every_binary_a_step_can_launch(model_dir, tmp_path):
    """The token counts the warm-up compiles on a GPU: one per new (emitted module, integer
    specialisation). With a tuned QKV config cached at M=24, the first token count that resolves it
    (20: within the dispatch's distance limit, ln(24/20) < 0.223) must be compiled too."""
    from autotune import cache as config_cache
    from engine.warmup import binary_key, compile_plan

    path = tmp_path / "cache.json"
    llm = LLM(model_dir, block_size=4, num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=40, config_cache=path)
    # The interpreter compiles nothing ahead; on a GPU the warm-up compiled its plan.
    assert (llm.compile_plan == ([], [])) == (llm.device.type == "cpu")
    c, gemm, dtype = llm.config, autotune.families.resolve("gemm"), dtype_name(llm.dtype)
    shape = {"M": 24, "N": (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, "K": c.hidden_size, "b_transposed": True}
    default = gemm.default_config(shape, dtype)
    tuned = next(cfg for cfg in gemm.configs(shape, dtype) if cfg != default)
    config_cache.write(path, [{"family": "gemm", "dtype": dtype, "shape": shape, "config": tuned}])
    llm.runner.model.ops.refresh()

    tokens, rows = compile_plan(llm.runner, 40, 4)
    assert {1, 2, 16} <= set(tokens)
    assert 20 in tokens and all(1 <= t <= 40 for t in tokens) and len(tokens) < 40
    assert all(2 <= b <= 4 for b in rows)  # one row of logits is what every prefill step computes

    def keys(t: int) -> set:
        with llm.runner.model.ops.dry_run() as resolved:
            llm.runner.run_dummy(1, t, t)
        return {binary_key(r) for r in resolved.values()}

    planned = set().union(*(keys(t) for t in tokens))
    assert all(keys(t) <= planned for t in range(1, 41))
    assert any(k[0] == gemm.resolve(shape, dtype, tuned)[1].__name__ for k in planned)


def test_decode_buffers_start_initialised(model_dir, device):
    """Every row a padded decode step sends holds what the device buffers started with (block 0,
    slot -1, one cached token) until a sequence writes it: on a GPU the pinned host copies are
    sent whole, so they must not start as uninitialised memory."""
    llm = LLM(model_dir, kernels="triton", device=device, block_size=4, num_kv_blocks=9, max_num_seqs=4,
              max_num_batched_tokens=8, enforce_eager=True)
    llm.runner.capture_decode_graphs([1, 2, 4], llm.max_model_len, capture=False)
    g = llm.runner.graphs
    for host in g._host_sets:
        for h, dev in zip(host, g._device_buffers):
            assert torch.equal(h, dev.cpu())
        assert (host[4] == 0).all() and (host[2] == -1).all() and (host[3] == 1).all()


@pytest.mark.gpu
def test_multi_step_windows_on_cuda_graphs_give_the_single_step_tokens(tmp_path_factory):
    """On the GPU (--gpu), where the windows replay captured CUDA graphs: the same greedy tokens as
    single steps of the same engine setup, with windows of the batch of 3 (padded to 4) and of 1."""
    model_dir = checkpoint("llama3", tmp_path_factory)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 5, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (9, 14, 6)]
    outs = {}
    for k in (1, 4):
        llm = LLM(model_dir, block_size=4, num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=32,
                  num_decode_steps=k)
        assert llm.uses_cuda_graphs
        windows, real = [], llm.runner.graphs.launch_window

        def recording(seqs, steps, ahead=0, real=real, windows=windows):
            windows.append((len(seqs), steps))
            return real(seqs, steps, ahead)

        llm.runner.graphs.launch_window = recording
        outs[k] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert bool(windows) == (k > 1), windows
    assert outs[4] == outs[1]
    assert [len(t) for t in outs[4]] == [9, 14, 6]


@pytest.mark.gpu
def test_cuda_graphs_per_context_bucket_give_the_eager_padded_tokens(tmp_path_factory):
    """On the GPU (--gpu): windows crossing from the 256-token context bucket into the last one
    (max_model_len 400) replay one graph per (batch, context) bucket whose configs differ (the
    default split count grows with the context), and give the greedy tokens of the same padded steps
    run eagerly, which launch the same configs."""
    model_dir = checkpoint("llama3", tmp_path_factory)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (236, 250)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = LLM(model_dir, block_size=16, num_kv_blocks=60, max_num_seqs=2, max_model_len=400,
              max_num_batched_tokens=512, config_cache=tmp_path_factory.mktemp("cache") / "cache.json")
    assert llm.uses_cuda_graphs and llm.runner.graphs.contexts == [256, 400]
    assert llm.runner.graphs.num_graphs == 4  # batch buckets 1 and 2, each at both context buckets
    captured = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.runner.capture_decode_graphs([1, 2], llm.max_model_len, capture=False)
    eager = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert captured == eager and [len(t) for t in captured] == [40, 40]
