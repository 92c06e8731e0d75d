"""The engine's public behaviour on a tiny checkpoint (CPU, float32, PyTorch attention): text
prompts and outputs, seeded sampling, stop conditions, bad input, cache sizing, the checkpoint CLI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.checkpoint import main as checkpoint_main
from engine_checkpoints import checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return checkpoint("llama3", tmp_path_factory)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, kernels="torch", block_size=4, num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=32)


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_text_prompts_and_outputs(llm):
    prompts = ["The quick brown fox", "Café 日本語 🙂", "x"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    tok = llm.tokenizer
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.index == i and o.prompt == p
        assert o.prompt_token_ids == tok(p).input_ids and o.prompt_token_ids[0] == llm.config.bos_token_id
        assert len(o.token_ids) == 10 and o.finish_reason == "length"
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    # The same prompt as token ids gives the same tokens.
    again = llm.generate([outs[0].prompt_token_ids], GREEDY, use_tqdm=False)[0]
    assert again.token_ids == outs[0].token_ids and again.prompt is None


def test_seeded_request_ignores_its_batch(model_dir):
    """Same tokens alone and inside a mixed batch that forces chunked prefill and preemption."""
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    prompt = list(range(20, 37))
    alone_llm = LLM(model_dir, kernels="torch", block_size=4, num_kv_blocks=64)
    alone = alone_llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    again = alone_llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids

    busy = LLM(model_dir, kernels="torch", block_size=4, num_kv_blocks=16, max_num_seqs=5, max_num_batched_tokens=12)
    g = torch.Generator().manual_seed(3)
    others = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (25, 3, 14, 9)]
    mixed_params = [
        SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.8, max_tokens=12, seed=99, ignore_eos=True),
        SamplingParams(temperature=1.3, top_k=5, max_tokens=10, ignore_eos=True),
    ]
    outs = busy.generate(others[:2] + [prompt] + others[2:], mixed_params[:2] + [seeded] + mixed_params[2:], use_tqdm=False)
    assert busy.scheduler.stats.preemptions > 0 and busy.scheduler.stats.partial_prefills > 0
    assert alone == again == outs[2].token_ids
    other_seed = SamplingParams(**{**seeded.__dict__, "seed": 4321})
    assert alone_llm.generate([prompt], other_seed, use_tqdm=False)[0].token_ids != alone


def test_token_ids_without_text(llm):
    with_text = llm.generate(["The quick brown fox"], GREEDY, use_tqdm=False)[0]
    ids_only = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, detokenize=False)
    out = llm.generate(["The quick brown fox"], ids_only, use_tqdm=False)[0]
    assert out.token_ids == with_text.token_ids and with_text.text and out.text == ""
    with pytest.raises(TypeError, match="detokenize must be a bool"):
        SamplingParams(detokenize="no")


def test_stop_token_ids(llm):
    prompt = [[5, 80, 200, 31, 7]]
    full = llm.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids
    stop = full[4]
    first = full.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                                              stop_token_ids=(stop,)), use_tqdm=False)[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop"
    short = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[0]
    assert short.token_ids == full[:3] and short.finish_reason == "length"


def test_eos_from_generation_config(model_dir, tmp_path):
    """An EOS id listed in generation_config.json stops a request unless ignore_eos."""
    probe = LLM(model_dir, kernels="torch", block_size=4, num_kv_blocks=40)
    prompt = [[9, 44, 301, 12]]
    full = probe.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids
    eos = full[3]
    first = full.index(eos)
    patched = tmp_path / "patched"
    shutil.copytree(model_dir, patched)
    gen = json.loads((patched / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"][0], eos]
    (patched / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(patched, kernels="torch", block_size=4, num_kv_blocks=40)
    assert eos in llm.config.eos_token_ids
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)[0]
    assert stopped.token_ids == full[: first + 1] and stopped.finish_reason == "stop"
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids == full


@pytest.mark.parametrize(
    "prompts, params, error, match",
    [
        (["ok", ""], None, ValueError, "request 1: prompt is empty"),
        ([[1, 2], []], None, ValueError, "request 1: prompt is empty"),
        ([[1, 2], [3, 512]], None, ValueError, r"request 1: prompt token 1 is 512, outside the vocabulary \[0, 512\)"),
        ([[1, -1]], None, ValueError, "request 0: prompt token 1 is -1"),
        ([[1, 2.0]], None, TypeError, "request 0: prompt token 1 must be an int"),
        ([[3] * 513], None, ValueError, "request 0: prompt has 513 tokens, more than the model's max_position_embeddings=512"),
        ([[3] * 161], None, ValueError, "request 0: prompt has 161 tokens, more than the whole KV cache holds"),
        ([[1], [2]], [SamplingParams()], ValueError, "got 1 sampling_params for 2 prompts"),
        ([[1, 2]], "greedy", TypeError, "sampling_params must be a SamplingParams"),
        ([1, 2], None, TypeError, "wrap a single token-id prompt"),
        ([[1], [2]], [SamplingParams(), SamplingParams(stop_token_ids=(600,))], ValueError,
         "request 1: SamplingParams.stop_token_ids holds 600"),
    ],
)
def test_bad_requests(llm, prompts, params, error, match):
    before = llm.generate([[4, 5, 6]], GREEDY, use_tqdm=False)[0].token_ids
    with pytest.raises(error, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert not llm.scheduler.has_unfinished() and llm.block_manager.num_free_blocks == 40
    assert llm.generate([[4, 5, 6]], GREEDY, use_tqdm=False)[0].token_ids == before  # still usable


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("max_tokens", 0, "SamplingParams.max_tokens must be >= 1"),
        ("temperature", -0.5, "SamplingParams.temperature must be >= 0"),
        ("top_p", 0.0, r"SamplingParams.top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"SamplingParams.top_p must be in \(0, 1\]"),
        ("top_k", -1, "SamplingParams.top_k must be >= 0"),
    ],
)
def test_bad_sampling_params(llm, field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})
    # A SamplingParams changed after construction is caught at generate, naming the request.
    params = [SamplingParams(), SamplingParams()]
    setattr(params[1], field, value)
    with pytest.raises(ValueError, match=f"request 1: {match}"):
        llm.generate([[1, 2], [3, 4]], params, use_tqdm=False)
    assert not llm.scheduler.has_unfinished()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kernels="cuda"), ValueError, "kernels must be one of"),
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(block_size=6, kernels="triton"), ValueError, "power of two"),
        (dict(num_kv_blocks=2.5), TypeError, "num_kv_blocks must be an int"),
        (dict(dtype="float64"), TypeError, "dtype must be one of"),
    ],
)
def test_bad_engine_arguments(model_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        LLM(model_dir, **kwargs)


def test_cache_sized_from_memory_budget_on_cpu(model_dir):
    llm = LLM(model_dir, kernels="torch", max_num_seqs=2)
    # The CPU budget holds far more than two full-length sequences, so the cap applies: 2 x 512 / 16.
    assert llm.num_kv_blocks == 64 and llm.max_model_len == 512
    assert llm.runner.k_caches.shape == (2, 64, 16, 2, 32)


def test_checkpoint_cli(tmp_path):
    checkpoint_main(["--preset", "tiny", "--out", str(tmp_path / "ck"), "--seed", "5", "--tie-embeddings",
                     "--rope-scaling", "linear", "--old-config-layout"])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "rope_parameters" not in cfg
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["rope_theta"] == 10000.0
    # float32 on any device: the reference below is transformers in float32.
    llm = LLM(tmp_path / "ck", kernels="torch", num_kv_blocks=8, dtype=torch.float32)
    assert llm.config.rope.rope_type == "linear" and llm.runner.model.weights.lm_head is llm.runner.model.weights.embed
    # Linear RoPE scaling as transformers applies it: prompt log-probabilities of a 40-token prompt.
    prompt = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=True), use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].double().log_softmax(-1)
    want = ref[torch.arange(39), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:], dtype=torch.float64), want, rtol=0, atol=1e-4)


def test_error_inside_a_step_leaves_engine_usable(llm, monkeypatch):
    """A failure mid-generation (here the third step) frees every block and drops the requests."""
    expected = llm.generate([[4, 5, 6], [7, 8]], GREEDY, use_tqdm=False)
    real_run, calls = llm.runner.run, []

    def failing_run(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_run(batch)

    monkeypatch.setattr(llm.runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate([[4, 5, 6], [7, 8]], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not llm.scheduler.has_unfinished() and llm.block_manager.num_free_blocks == 40
    again = llm.generate([[4, 5, 6], [7, 8]], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in expected]


def test_online_requests_join_a_running_batch(llm):
    """add_request/step: a request arriving mid-generation gets the tokens it gets alone."""
    alone = [o.token_ids for o in llm.generate([[4, 5, 6], "Later prompt"], GREEDY, use_tqdm=False)]
    first = llm.add_request([4, 5, 6], GREEDY, index=0)
    for _ in range(3):
        llm.step()
    assert first.num_output_tokens == 3
    second = llm.add_request("Later prompt", GREEDY, index=1)
    while llm.has_unfinished():
        llm.step()
    outs = [llm.output(first), llm.output(second)]
    assert [o.token_ids for o in outs] == alone and outs[1].prompt == "Later prompt"
    with pytest.raises(ValueError, match="request 7: prompt is empty"):
        llm.add_request("", GREEDY, index=7)
