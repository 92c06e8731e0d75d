"""The engine against Hugging Face transformers on the same checkpoints (CPU, float32), with its
PyTorch operators and with every operator on a Triton family (the interpreter), and the padded
decode steps that CUDA graphs replay.

Greedy decoding must give the same tokens as ``LlamaForCausalLM.generate`` token for token, with a
KV cache small enough that the scheduler preempts and a token budget small enough that it chunks
prefills, so those paths are part of what is compared.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine_checkpoints import checkpoint

# The engine picks the CPU and float32 here, like the transformers reference it is compared with.
pytestmark = pytest.mark.cpu_only(reason="CPU float32 comparison; on the GPU, experiments.engine_agreement checks bfloat16")

PROMPT_LENS = [1, 2, 4, 7, 11, 15, 19, 23, 27, 30]
MAX_TOKENS = 12


def _prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _hf_greedy(model_dir, prompts, max_tokens):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


# The Triton run takes the tiny preset's head dim 16 (tied_old), where attention tiles are smallest.
@pytest.mark.parametrize("name, kernels", [("tied_old", "torch"), ("llama3", "torch"), ("tied_old", "triton")])
def test_greedy_matches_transformers(name, kernels, tmp_path_factory):
    model_dir = checkpoint(name, tmp_path_factory)
    # 24 blocks of 4 slots hold 96 tokens; the prompts and their outputs need about 260.
    llm = LLM(model_dir, kernels=kernels, block_size=4, num_kv_blocks=24, max_num_seqs=6,
              max_num_batched_tokens=16)
    prompts = _prompts(llm.config.vocab_size, PROMPT_LENS)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    stats = llm.scheduler.stats
    assert stats.preemptions > 0 and stats.partial_prefills > 0, stats
    assert stats.max_step_tokens <= 16 and stats.max_step_seqs <= 6
    llm.block_manager.check_invariants([])
    assert llm.block_manager.num_free_blocks == 24

    expected = _hf_greedy(model_dir, prompts, MAX_TOKENS)
    for i, (o, ref) in enumerate(zip(outs, expected)):
        assert o.prompt_token_ids == prompts[i]
        assert o.token_ids == ref, f"prompt {i} (length {len(prompts[i])})"
        assert o.finish_reason == ("stop" if len(ref) < MAX_TOKENS else "length")
    # The comparison means something only if the model's greedy choices depend on the context.
    assert len({t for o in outs for t in o.token_ids}) > 30


def test_logprobs_match_transformers(tmp_path_factory):
    """Prompt log-probabilities (through chunked prefill) and generated tokens' log-probabilities."""
    model_dir = checkpoint("llama3", tmp_path_factory)
    llm = LLM(model_dir, kernels="torch", block_size=4, num_kv_blocks=64, max_num_batched_tokens=8)
    prompts = _prompts(llm.config.vocab_size, [13, 20], seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=True, prompt_logprobs=True, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p, o in zip(prompts, outs):
        full = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            ref = model(full).logits[0].double().log_softmax(-1)
        want = ref[torch.arange(full.shape[1] - 1), full[0, 1:]]  # logprob of token t+1 given tokens <= t
        got = torch.tensor(o.prompt_logprobs[1:] + o.logprobs, dtype=torch.float64)
        assert o.prompt_logprobs[0] is None and len(o.logprobs) == 4
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_padded_decode_steps_match_transformers(tmp_path_factory):
    """Decode steps served as CUDA graphs serve them -- padded to a batch bucket over static buffers,
    padding rows with slot -1 -- here run eagerly on the CPU through every Triton kernel: same tokens
    as transformers, through preemption (new block lists) and batches that shrink and regrow."""
    model_dir = checkpoint("llama3", tmp_path_factory)
    llm = LLM(model_dir, kernels="triton", block_size=4, num_kv_blocks=9, max_num_seqs=4, max_num_batched_tokens=8)
    llm.runner.capture_decode_graphs([1, 2, 4], llm.max_model_len, capture=False)
    graphs, sizes = llm.runner.graphs, []
    real_run = graphs.run

    def counting_run(seqs):
        sizes.append(len(seqs))
        return real_run(seqs)

    graphs.run = counting_run
    prompts = _prompts(512, [1, 6, 11, 17], seed=2)  # 35 prompt + 24 new tokens, 36 cache slots
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert llm.scheduler.stats.preemptions > 0, llm.scheduler.stats
    assert 3 in sizes and 1 in sizes, sizes  # a batch padded from 3 to 4, and a batch of one
    assert [o.token_ids for o in outs] == _hf_greedy(model_dir, prompts, 6)


def test_agreement_experiment_smoke(tmp_path):
    """The GPU agreement script end to end on the tiny preset in float32 (CSV written, all within tolerance)."""
    import pandas as pd

    from experiments.engine_agreement import main

    out = tmp_path / "agree.csv"
    main(["--preset", "tiny", "--dtype", "float32", "--kernels", "torch", "--prompts", "4", "--tokens", "6",
          "--max-prompt-len", "40", "--max-num-batched-tokens", "16", "--out", str(out)])
    df = pd.read_csv(out)
    assert len(df) == 4 and df.ok.all() and df.tokens_equal.all()
    assert {"device", "torch", "triton", "transformers", "date", "first_divergence", "max_abs_dlogprob"} <= set(df.columns)
    assert df.max_abs_dlogprob.max() < 1e-4  # float32 against float32


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_multi_step_decode_windows_give_the_same_tokens(kernels, tmp_path_factory):
    """num_decode_steps=4 on the padded decode path (run eagerly on the CPU): windows of several
    decode steps, each fed the previous step's argmax on the device, give transformers' greedy
    tokens. The windows shrink to the tokens a request has left, a stop token inside a window ends
    its request there, a batch of 3 is padded to 4 (slot -1 writes nothing in either backend), and
    every block is free at the end."""
    model_dir = checkpoint("llama3", tmp_path_factory)
    prompts = _prompts(512, [3, 5, 9], seed=4)
    lengths = [7, 10, 5]
    ref = [_hf_greedy(model_dir, [p], n)[0] for p, n in zip(prompts, lengths)]
    stop = ref[1][4]  # request 1 stops at its first occurrence of its fifth greedy token
    want = [ref[0], ref[1][: ref[1].index(stop) + 1], ref[2]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, stop_token_ids=(stop,) if i == 1 else ())
              for i, n in enumerate(lengths)]
    llm = LLM(model_dir, kernels=kernels, block_size=4, num_kv_blocks=16, max_num_seqs=4, max_num_batched_tokens=32,
              num_decode_steps=4)
    llm.runner.capture_decode_graphs([1, 2, 4], llm.max_model_len, capture=False)
    windows = []
    real = llm.runner.graphs.launch_window

    def recording(seqs, steps, ahead=0):
        windows.append((len(seqs), steps))
        return real(seqs, steps, ahead)

    llm.runner.graphs.launch_window = recording
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == want
    assert [o.finish_reason for o in outs] == ["length", "stop", "length"]
    assert (3, 4) in windows and any(steps < 4 for _, steps in windows), windows
    assert llm.block_manager.num_free_blocks == llm.num_kv_blocks


def test_async_scheduling_launches_windows_ahead_with_the_same_tokens(tmp_path_factory):
    """async_scheduling (the default) launches the next decode window before reading the last one's
    tokens: windows continue on the device's input ids (launched ``ahead``), the tokens equal
    transformers' greedy ones and the synchronous engine's, a stop token inside a window drops the
    window launched after it for that request, a request added while a window is in flight is
    served, and every block is free at the end."""
    model_dir = checkpoint("llama3", tmp_path_factory)
    prompts = _prompts(512, [3, 6, 9, 4], seed=7)
    lengths = [17, 23, 11, 9]
    ref = [_hf_greedy(model_dir, [p], n)[0] for p, n in zip(prompts, lengths)]
    stop = ref[1][9]  # request 1 stops at the first occurrence of its tenth greedy token
    want = ref[:1] + [ref[1][: ref[1].index(stop) + 1]] + ref[2:]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, stop_token_ids=(stop,) if i == 1 else ())
              for i, n in enumerate(lengths)]
    outs, launches = {}, {}
    for flag in (True, False):
        llm = LLM(model_dir, kernels="torch", block_size=4, num_kv_blocks=40, max_num_seqs=4,
                  max_num_batched_tokens=32, num_decode_steps=3, async_scheduling=flag)
        llm.runner.capture_decode_graphs([1, 2, 4], llm.max_model_len, capture=False)
        launches[flag], real = [], llm.runner.graphs.launch_window

        def recording(seqs, steps, ahead=0, real=real, log=launches[flag]):
            log.append(ahead)
            return real(seqs, steps, ahead)

        llm.runner.graphs.launch_window = recording
        seqs = [llm.add_request(p, sp, index=i) for i, (p, sp) in enumerate(zip(prompts[:3], params[:3]))]
        steps = 0
        while llm.has_unfinished():
            llm.step()
            steps += 1
            if steps == 3:  # a window is in flight with the async engine: request 3 arrives now
                assert (llm._pending is not None) == flag
                seqs.append(llm.add_request(prompts[3], params[3], index=3))
            llm.block_manager.check_invariants(llm.scheduler.running)
        outs[flag] = [llm.output(s) for s in seqs]
        assert llm.block_manager.num_free_blocks == llm.num_kv_blocks and llm._pending is None
    for flag in (True, False):
        assert [o.token_ids for o in outs[flag]] == want, flag
        assert [o.finish_reason for o in outs[flag]] == ["length", "stop", "length", "length"]
    assert any(launches[True]) and not any(launches[False]), launches


def test_serve_counts_every_token_of_a_window(tmp_path_factory):
    """bench_engine's serving loop with multi-step decode: each token a window delivers is counted
    once, and a window of k steps counts as k decode steps of its mean time."""
    from experiments.bench_engine import Request, serve

    llm = LLM(checkpoint("llama3", tmp_path_factory), kernels="torch", block_size=4, num_kv_blocks=32, max_num_seqs=4,
              num_decode_steps=3)
    llm.runner.capture_decode_graphs([1, 2, 4], llm.max_model_len, capture=False)
    reqs = [Request(p, n) for p, n in zip(_prompts(512, [4, 6], seed=5), [8, 5])]
    trace = serve(llm, reqs)
    assert [len(t) for t in trace.token_times] == [8, 5]
    assert all(np.all(np.diff(t) >= 0) for t in trace.token_times)
    assert len(trace.decode_steps) == 8 - 1  # every token after the first comes from a decode step

