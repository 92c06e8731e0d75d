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
from typing import Sequence as Seq

import torch
from tqdm.auto import tqdm

from engine.block_manager import BlockManager
from engine.config import load_config
from engine.detokenizer import IncrementalDetokenizer
from engine.loader import load_tokenizer, load_weights
from engine.model_runner import ModelRunner
from engine.models.llama import LlamaModel
from engine.ops import BACKENDS, get_ops
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
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
    float32 on the CPU. ``kernels`` "triton" runs attention on the paged attention family (the
    Triton interpreter on a CPU), "torch" on plain PyTorch. ``num_kv_blocks`` None sizes the cache
    from free memory (``gpu_memory_utilization`` of the device on CUDA). ``enforce_eager`` is
    accepted for CUDA graphs, which a later version captures for decode.
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
        enforce_eager: bool = False,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        if kernels not in BACKENDS:
            raise ValueError(f"LLM: kernels must be one of {list(BACKENDS)}, got {kernels!r}")
        block_size = _positive_int("block_size", block_size)
        max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        if num_kv_blocks is not None:
            num_kv_blocks = _positive_int("num_kv_blocks", num_kv_blocks)
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
        self.enforce_eager = enforce_eager

        self.config = load_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        weights = load_weights(model_dir, self.config, dtype, self.device)
        model = LlamaModel(self.config, weights, get_ops(kernels), self.device)
        self.runner = ModelRunner(model, block_size=block_size, device=self.device, dtype=dtype)
        if num_kv_blocks is None:
            num_kv_blocks = self.runner.auto_num_blocks(max_num_batched_tokens, max_num_seqs, gpu_memory_utilization)
        self.runner.allocate_kv_cache(num_kv_blocks)
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        # A sequence never outgrows the model's positions nor the whole cache.
        self.max_model_len = min(self.config.max_position_embeddings, num_kv_blocks * block_size)
        self.block_manager = BlockManager(num_kv_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=self.config.eos_token_ids,
        )
        self._detoks: dict[int, IncrementalDetokenizer] = {}
        self._prompt_texts: dict[int, str | None] = {}

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
        self._detoks[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.token_ids)
        self._prompt_texts[seq.seq_id] = prompt_text
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """One engine step: schedule, run the model, sample, retire finished requests.

        Returns the sequences that received a token this step (``seq.is_finished`` tells which are done).
        """
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []  # everything was preempted this step; the next step re-admits
        out = self.runner.run(batch)
        for seq, lp, plps in zip(batch.seqs, out.logprobs, out.prompt_logprobs):
            if lp is not None:
                seq.logprobs.append(lp)
            for pos, value in plps:
                seq.prompt_logprobs[pos] = value
        finished = self.scheduler.postprocess(batch, out.tokens)
        advanced = [seq for seq, token in zip(batch.seqs, out.tokens) if token is not None]
        for seq in advanced:
            self._detoks[seq.seq_id].add(seq.token_ids[-1])
        for seq in finished:
            self._detoks[seq.seq_id].flush()
            self.runner.release(seq)
        return advanced

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
            text=detok.text,
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs if seq.params.logprobs else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs else None,
        )

    def abort_all(self) -> None:
        """Drop every unfinished request and free its blocks."""
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
