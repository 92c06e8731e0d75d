"""The public entry point: ``LLM(model_dir, ...).generate(prompts, sampling_params)``.

An ``LLM`` loads a Hugging Face Llama folder, sizes and allocates the paged KV cache, and serves
batches of requests by continuous batching: each step the scheduler picks tokens to feed, the
model runner runs and samples, the scheduler appends the new tokens and retires finished requests,
whose text is detokenised incrementally. Every request is checked before any work starts, so a bad
one raises ``ValueError``/``TypeError`` naming the request and the field, and the engine stays usable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence as Seq

import torch
from tqdm.auto import tqdm

from engine.block_manager import BlockManager
from engine.config import load_config
from engine.cuda_graphs import Window, batch_buckets, context_buckets
from engine.detokenizer import IncrementalDetokenizer
from engine.loader import load_tokenizer, load_weights
from engine.model_runner import ModelRunner
from engine.models.llama import LlamaModel
from engine.ops import BACKENDS, CONFIG_MODES, get_ops
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.warmup import compile_ahead, compile_plan, resolve_configs, tune_configs
from kernels.family import DTYPES


@dataclass
class RequestOutput:
    """The result of one request. ``token_ids`` are the generated tokens only (a stopping EOS or
    stop token included); ``text`` is their decoding without special tokens; ``finish_reason`` is
    "stop" (EOS or a stop token) or "length" (max_tokens, or the model's context is full).
    ``logprobs`` / ``prompt_logprobs`` are filled when the sampling parameters asked for them
    (``prompt_logprobs[0]`` is None: the first token has no context)."""

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_logprobs: list[float | None] | None = None


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LLM: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"LLM: {name} must be >= 1, got {value}")
    return value


class LLM:
    """A paged, continuously batched Llama engine.

    ``device`` None picks CUDA when present, else the CPU; ``dtype`` None picks bfloat16 on CUDA and
    float32 on the CPU. ``kernels`` "triton" runs every operator on a kernels/ family (the Triton
    interpreter on a CPU) with the configs of the best-config cache (``kernel_configs="tuned"``,
    the cache file ``config_cache``, None for the device's default file) or the families' default
    configs (``kernel_configs="default"``); "torch" runs plain PyTorch. ``num_kv_blocks`` None sizes
    the cache from free memory (``gpu_memory_utilization`` of the device on CUDA). ``max_model_len``
    caps a sequence's length (prompt and output; None: the model's positions and the cache bound it).

    Before serving, a warm-up (:meth:`warmup`) resolves the Triton configs of every step size the
    engine runs -- tuning them first with ``tune_trials`` trials per shape when that is above 0 --
    and, on CUDA with kernels="triton", captures the decode step as CUDA graphs at batch-size
    buckets; ``enforce_eager=True`` keeps every step eager.

    ``num_decode_steps`` > 1 turns on multi-step decode where the padded decode path serves the
    steps (the CUDA graphs): while nothing waits and every running sequence decodes greedily
    without log-probabilities, one :meth:`step` runs up to that many decode steps back to back,
    each feeding the previous one's tokens on the device, and reads the tokens once. The host
    schedules, fills the inputs and waits for tokens once a window instead of once a step, while
    the GPU runs the steps back to back; tokens reach the caller a window at a time (vLLM's
    ``num_scheduler_steps``). The tokens are the same. With ``async_scheduling`` (the default), a
    step that runs a window first launches the next window of the same sequences, when nothing
    waits and their lengths allow it, and only then waits for its own window's tokens: the GPU runs
    the next window while the host accounts for the last (vLLM's ``async_scheduling``). A sequence
    that stops inside a window (a stop token) has the next window's tokens for it dropped.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        kernels: str = "triton",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        gpu_memory_utilization: float = 0.9,
        kernel_configs: str = "tuned",
        config_cache: str | Path | None = None,
        tune_trials: int = 0,
        num_decode_steps: int = 1,
        async_scheduling: bool = True,
    ) -> None:
        if kernels not in BACKENDS:
            raise ValueError(f"LLM: kernels must be one of {list(BACKENDS)}, got {kernels!r}")
        if kernel_configs not in CONFIG_MODES:
            raise ValueError(f"LLM: kernel_configs must be one of {list(CONFIG_MODES)}, got {kernel_configs!r}")
        block_size = _positive_int("block_size", block_size)
        max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        self.num_decode_steps = _positive_int("num_decode_steps", num_decode_steps)
        if not isinstance(async_scheduling, bool):
            raise TypeError(f"LLM: async_scheduling must be a bool, got {async_scheduling!r}")
        self.async_scheduling = async_scheduling
        if num_kv_blocks is not None:
            num_kv_blocks = _positive_int("num_kv_blocks", num_kv_blocks)
        if max_model_len is not None:
            max_model_len = _positive_int("max_model_len", max_model_len)
        if isinstance(tune_trials, bool) or not isinstance(tune_trials, int):
            raise TypeError(f"LLM: tune_trials must be an int, got {tune_trials!r}")
        if tune_trials < 0:
            raise ValueError(f"LLM: tune_trials must be >= 0 (0: no tuning), got {tune_trials}")
        if kernels == "triton" and block_size & (block_size - 1):
            raise ValueError(f"LLM: block_size must be a power of two for kernels='triton', got {block_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"LLM: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            if dtype not in DTYPES:
                raise TypeError(f"LLM: dtype must be one of {list(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        elif dtype not in DTYPES.values():
            raise TypeError(f"LLM: dtype must be one of {list(DTYPES)}, got {dtype}")
        self.dtype = dtype
        self.kernels = kernels
        self.kernel_configs = kernel_configs
        self.config_cache = config_cache
        self.enforce_eager = enforce_eager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens

        self.config = load_config(model_dir)
        if max_model_len is not None and max_model_len > self.config.max_position_embeddings:
            raise ValueError(f"LLM: max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        self.tokenizer = load_tokenizer(model_dir)
        weights = load_weights(model_dir, self.config, dtype, self.device)
        ops = get_ops(kernels, configs=kernel_configs, cache_path=config_cache)
        model = LlamaModel(self.config, weights, ops, self.device)
        self.runner = ModelRunner(model, block_size=block_size, device=self.device, dtype=dtype)
        length_cap = max_model_len or self.config.max_position_embeddings
        if num_kv_blocks is None:
            # The decode graphs keep their logits [bucket, V] (model dtype) alive, one per batch bucket
            # and context bucket at most.
            elt = torch.empty((), dtype=dtype).element_size()
            graph_bytes = (sum(batch_buckets(max_num_seqs)) * len(context_buckets(length_cap)) * self.config.vocab_size
                           * elt if self.uses_cuda_graphs else 0)
            num_kv_blocks = self.runner.auto_num_blocks(max_num_batched_tokens, max_num_seqs, gpu_memory_utilization,
                                                        length_cap, graph_bytes)
        self.runner.allocate_kv_cache(num_kv_blocks)
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        # A sequence never outgrows the model's positions, the cap asked for, nor the whole cache.
        self.max_model_len = min(length_cap, num_kv_blocks * block_size)
        self.block_manager = BlockManager(num_kv_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=self.config.eos_token_ids,
        )
        self._detoks: dict[int, IncrementalDetokenizer | None] = {}  # None: SamplingParams.detokenize off
        self._prompt_texts: dict[int, str | None] = {}
        self.last_batch: ScheduledBatch | None = None  # what the latest step ran (benchmarks read it)
        self._pending: tuple[ScheduledBatch, Window] | None = None  # a window launched, not yet read
        self.resolved_configs: list[dict[str, Any]] = []  # the warm-up's shape set (see engine/warmup.py)
        self.tuned_configs: list[dict[str, Any]] = []
        self.compile_plan: tuple[list[int], list[int]] = ([], [])  # token and row counts compiled ahead
        self.warmup(tune_trials=tune_trials)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (CUDA, kernels="triton", not enforce_eager)."""
        return self.device.type == "cuda" and self.kernels == "triton" and not self.enforce_eager

    def warmup(
        self,
        *,
        tune_trials: int = 0,
        sampler: str = "tpe",
        families: list[str] | None = None,
        decode_sizes: list[int] | None = None,
        prefill_sizes: list[int] | None = None,
        timeout_s: float = 60.0,
        storage: str | Path | None = None,
        compile_kernels: bool = True,
    ) -> list[dict[str, Any]]:
        """Resolve (and with ``tune_trials`` > 0 first tune) the Triton configs of the engine's steps,
        compile their kernels, then capture the decode CUDA graphs. Returns the shape set
        (``resolved_configs``).

        Steps: decode at ``decode_sizes`` sequences (default: the CUDA-graph batch buckets up to
        max_num_seqs) over the longest allowed context, and one-sequence prefill chunks of
        ``prefill_sizes`` tokens (default: max_num_batched_tokens, capped by max_model_len). Tuning
        runs ``autotune.tune`` with ``tune_trials`` trials and ``sampler`` on each distinct shape of
        ``families`` (default all) and writes the winners into the config cache (its studies go to the
        Optuna ``storage``, None for autotune's default file under results/). Does nothing with
        kernels="torch". Call it while no request is running (it writes the KV cache on CUDA).

        ``compile_kernels`` (CUDA only: the interpreter compiles nothing): launch once the step sizes
        of :func:`engine.warmup.compile_plan` -- every kernel binary a step of up to
        max_num_batched_tokens tokens, or the logits of up to max_num_seqs rows, can launch -- so that
        no request waits for Triton's compiler (``compile_plan`` keeps the token and row counts).
        """
        if self.kernels != "triton":
            return []
        if self.scheduler.has_unfinished():
            raise ValueError("LLM.warmup: requests are running; call it while the engine is idle")
        decode_sizes = list(decode_sizes or batch_buckets(self.max_num_seqs))
        prefill_sizes = list(prefill_sizes or [min(self.max_num_batched_tokens, self.max_model_len)])
        for name, sizes, cap in (("decode_sizes", decode_sizes, self.max_num_seqs),
                                 ("prefill_sizes", prefill_sizes, self.max_model_len)):
            if any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cap for n in sizes):
                raise ValueError(f"LLM.warmup: {name} must be ints in 1..{cap}, got {sizes}")
        rows = resolve_configs(self.runner, decode_sizes, prefill_sizes, self.max_model_len)
        if tune_trials:
            self.tuned_configs = tune_configs(rows, n_trials=tune_trials, sampler=sampler, families=families,
                                              cache_path=self.config_cache, storage=storage, timeout_s=timeout_s)
            self.runner.model.ops.refresh()
            rows = resolve_configs(self.runner, decode_sizes, prefill_sizes, self.max_model_len)
        self.resolved_configs = rows
        if compile_kernels and self.device.type == "cuda":
            self.compile_plan = compile_plan(self.runner, min(self.max_num_batched_tokens, self.max_model_len),
                                             self.max_num_seqs)
            compile_ahead(self.runner, *self.compile_plan)
        if self.uses_cuda_graphs:
            self.runner.capture_decode_graphs(batch_buckets(self.max_num_seqs), self.max_model_len,
                                              window_steps=self.num_decode_steps)
        return rows

    # --- checking requests ----------------------------------------------------------------------
    def _prompt_ids(self, i: int, prompt: object) -> list[int]:
        vocab = self.config.vocab_size
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"request {i}: prompt is empty")
            ids = list(self.tokenizer(prompt).input_ids)
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError(f"request {i}: prompt is empty")
            for j, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"request {i}: prompt token {j} must be an int, got {t!r}")
            ids = list(prompt)
        else:
            raise TypeError(f"request {i}: prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        for j, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise ValueError(f"request {i}: prompt token {j} is {t}, outside the vocabulary [0, {vocab})")
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(
                f"request {i}: prompt has {len(ids)} tokens, more than the model's "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if len(ids) > self.num_kv_blocks * self.block_size:
            raise ValueError(
                f"request {i}: prompt has {len(ids)} tokens, more than the whole KV cache holds "
                f"({self.num_kv_blocks} blocks x {self.block_size} = {self.num_kv_blocks * self.block_size} tokens)"
            )
        if len(ids) > self.max_model_len:
            raise ValueError(f"request {i}: prompt has {len(ids)} tokens, more than max_model_len={self.max_model_len}")
        return ids

    def _params(self, i: int, params: object) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {i}: sampling_params must be a SamplingParams, got {type(params).__name__}")
        try:
            params.validate()
        except (ValueError, TypeError) as e:
            raise type(e)(f"request {i}: {e}") from None
        for t in params.stop_token_ids:
            if not 0 <= t < self.config.vocab_size:
                raise ValueError(
                    f"request {i}: SamplingParams.stop_token_ids holds {t}, outside the vocabulary [0, {self.config.vocab_size})"
                )
        return params

    def _requests(
        self, prompts: Seq[str] | Seq[Seq[int]], sampling_params: SamplingParams | Seq[SamplingParams] | None
    ) -> list[tuple[str | None, list[int], SamplingParams]]:
        """(prompt text or None, prompt token ids, sampling params) of every request, all checked."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
        if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            raise TypeError("prompts must be a list of prompts; wrap a single token-id prompt in a list: [[...]]")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
        return [
            (p if isinstance(p, str) else None, self._prompt_ids(i, p), self._params(i, sp))
            for i, (p, sp) in enumerate(zip(prompts, params_list))
        ]

    # --- serving --------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | Seq[int], sampling_params: SamplingParams | None = None, *, index: int = 0
    ) -> Sequence:
        """Check one request and queue it; ``step`` then serves it. ``index`` names it in errors
        and in its output. For online serving; ``generate`` does this for a whole batch."""
        params = self._params(index, SamplingParams() if sampling_params is None else sampling_params)
        seq = Sequence(index, self._prompt_ids(index, prompt), params)
        self._queue(seq, prompt if isinstance(prompt, str) else None)
        return seq

    def _queue(self, seq: Sequence, prompt_text: str | None) -> None:
        self._detoks[seq.seq_id] = (
            IncrementalDetokenizer(self.tokenizer, seq.token_ids) if seq.params.detokenize else None)
        self._prompt_texts[seq.seq_id] = prompt_text
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """One engine step: schedule, run the model, sample, retire finished requests. With
        ``num_decode_steps`` > 1 it may be a window of several decode steps (``last_batch.num_steps``);
        with ``async_scheduling`` the next window may already be running when it returns.

        Returns the sequences that received tokens this step: one each, or up to a window's steps
        (``seq.is_finished`` tells which are done).
        """
        if self._pending is not None:
            batch, window = self._pending
            self._pending = None
        else:
            max_steps = self.num_decode_steps if self.runner.graphs is not None else 1
            batch = self.scheduler.schedule(max_steps)
            window = self.runner.launch_window(batch) if batch.num_steps > 1 else None
        self.last_batch = batch
        if not batch.seqs:
            return []  # everything was preempted this step; the next step re-admits
        before = [seq.num_tokens for seq in batch.seqs]
        if window is not None:
            ahead = self.scheduler.schedule_ahead(batch, self.num_decode_steps) if self.async_scheduling else None
            if ahead is not None:  # launched before this window's tokens are read: the GPU keeps busy
                self._pending = (ahead, self.runner.launch_window(ahead, batch.num_steps))
            finished = self.scheduler.postprocess_window(batch, window.result())
            if self._pending is not None and all(seq.is_finished for seq in self._pending[0].seqs):
                self._pending = None  # every sequence of it stopped: its tokens would all be dropped
        else:
            out = self.runner.run(batch)
            for seq, lp, plps in zip(batch.seqs, out.logprobs, out.prompt_logprobs):
                if lp is not None:
                    seq.logprobs.append(lp)
                for pos, value in plps:
                    seq.prompt_logprobs[pos] = value
            finished = self.scheduler.postprocess(batch, out.tokens)
        # A sequence that stopped in an earlier window (whose output may be gone) gains nothing here.
        grown = [(seq, n) for seq, n in zip(batch.seqs, before) if seq.num_tokens > n]
        for seq, n in grown:
            detok = self._detoks[seq.seq_id]
            if detok is not None:
                for token in seq.token_ids[n:]:
                    detok.add(token)
        for seq in finished:
            detok = self._detoks[seq.seq_id]
            if detok is not None:
                detok.flush()
            self.runner.release(seq)
        return [seq for seq, _ in grown]

    def output(self, seq: Sequence) -> RequestOutput:
        """The result of a finished request (and forget its detokeniser)."""
        if not seq.is_finished:
            raise ValueError(f"request {seq.index} has not finished")
        detok = self._detoks.pop(seq.seq_id)
        return RequestOutput(
            index=seq.index,
            prompt=self._prompt_texts.pop(seq.seq_id),
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.output_token_ids,
            text=detok.text if detok is not None else "",
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs if seq.params.logprobs else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs else None,
        )

    def abort_all(self) -> None:
        """Drop every unfinished request (and a window launched ahead) and free its blocks."""
        self._pending = None
        for seq in self.scheduler.abort_all():
            self.runner.release(seq)
            self._detoks.pop(seq.seq_id, None)
            self._prompt_texts.pop(seq.seq_id, None)

    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs in the prompts' order.

        ``sampling_params``: one for all prompts, one per prompt, or None for the defaults. Every
        request is checked before any is queued. An error inside a step aborts all requests.
        """
        requests = self._requests(prompts, sampling_params)
        seqs = [Sequence(i, ids, params) for i, (_, ids, params) in enumerate(requests)]
        for seq, (text, _, _) in zip(seqs, requests):
            self._queue(seq, text)
        try:
            with tqdm(total=len(seqs), desc="generate", unit="req", disable=not use_tqdm) as bar:
                while self.scheduler.has_unfinished():
                    bar.update(sum(seq.is_finished for seq in self.step()))
        except BaseException:
            self.abort_all()
            raise
        return [self.output(s) for s in seqs]
