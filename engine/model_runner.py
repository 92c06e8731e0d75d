"""The data plane: turns a scheduled step into tensors, runs the model, samples.

Per step, for B scheduled sequences feeding T tokens in all, it builds
- input_ids [T], positions [T] (int64): each sequence's next tokens and their positions;
- slot_mapping [T] (int64): the cache slot ``block_table[p // block_size] * block_size + p % block_size``
  where token p's K and V are written;
- cu_seqlens_q [B + 1], context_lens [B] (tokens in the cache once this step's are written) and
  block_tables [B, max_blocks] (int32, padded with block 0, which no query ever sees);
runs the model, computes logits only for the rows that need them (each sampling sequence's last
row, and prompt rows whose log-probabilities were asked for) and samples.
The KV cache is one tensor per K and V: [num_layers, num_blocks, block_size, Hkv, D].

A step whose sequences all decode (one token each) replays a CUDA graph of its batch-size bucket
instead (engine/cuda_graphs.py), when the graphs were captured (``capture_decode_graphs``); a
multi-step decode window (``launch_window``) replays it once a step, chaining the greedy tokens on
the device, and may be launched before the window ahead of it has been read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.cuda_graphs import DecodeGraphs, Window
from engine.models.llama import AttentionMetadata, LlamaModel
from engine.sampler import Sampler, greedy_argmax
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

CPU_KV_CACHE_BYTES = 1 << 30  # the KV cache's share of host memory when running on the CPU


@dataclass
class _StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    rows: list[int]  # hidden-state rows whose logits are needed
    prompt_rows: list[list[tuple[int, int, int]]]  # per sequence: (index into rows, position, prompt token)
    sample_rows: list[int]  # per sampling sequence: index into rows of its last token


@dataclass
class StepOutput:
    """Per scheduled sequence: the sampled token (None if it did not sample), its log-probability
    (when asked for), and (position, log-probability) of the prompt tokens this step predicted."""

    tokens: list[int | None]
    logprobs: list[float | None]
    prompt_logprobs: list[list[tuple[int, float]]]


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V."""
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elt


class ModelRunner:
    """Owns the model, the paged KV cache and the sampler of one engine."""

    def __init__(self, model: LlamaModel, *, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.sampler = Sampler(device)
        self._generators: dict[int, torch.Generator] = {}
        self.k_caches = self.v_caches = torch.empty(0)
        self.graphs: DecodeGraphs | None = None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Zero-filled caches, so that never-written slots hold finite values (graphs of the old
        cache are dropped: they read and write its memory)."""
        c = self.config
        shape = (c.num_layers, num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        self.graphs = None
        self.k_caches = self.v_caches = torch.empty(0)  # let the old cache go first
        self.k_caches = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_caches = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def auto_num_blocks(self, max_num_batched_tokens: int, max_num_seqs: int, memory_utilization: float,
                        max_model_len: int, reserve_bytes: int = 0) -> int:
        """How many KV blocks fit in memory, capped at what max_num_seqs sequences of max_model_len use.

        On CUDA: run one step of ``max_num_batched_tokens`` prompt tokens with a cache just big
        enough to hold them, measure the step's peak activation memory, and give the cache what
        is left of ``memory_utilization`` of the device after ``reserve_bytes`` (the CUDA graphs'
        outputs). On the CPU: CPU_KV_CACHE_BYTES.
        """
        c = self.config
        per_block = kv_block_bytes(c, self.block_size, self.dtype)
        cap = max_num_seqs * -(-max_model_len // self.block_size)
        if self.device.type != "cuda":
            return max(1, min(cap, CPU_KV_CACHE_BYTES // per_block))
        n = min(max_num_batched_tokens, max_model_len)
        self.allocate_kv_cache(-(-n // self.block_size))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        probe = Sequence(0, [0] * n, SamplingParams(temperature=0.0, max_tokens=1))
        probe.block_table = list(range(self.k_caches.shape[1]))
        self.run(ScheduledBatch([probe], [n]))
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        self.allocate_kv_cache(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - memory_utilization) * total - activations - reserve_bytes
        blocks = int(budget // per_block)
        if blocks < 1:
            raise ValueError(
                f"no device memory left for the KV cache ({free / 2**30:.1f} GiB free, a step needs "
                f"{activations / 2**30:.1f} GiB); lower max_num_batched_tokens or raise gpu_memory_utilization"
            )
        return min(cap, blocks)

    def capture_decode_graphs(self, sizes: list[int], max_context_len: int, *, capture: bool = True,
                              window_steps: int = 8) -> None:
        """Decode steps of up to ``max(sizes)`` sequences run padded to a size of ``sizes`` over
        static buffers, with attention bounded by a context bucket of ``max_context_len``
        (``engine.cuda_graphs.context_buckets``), replayed as CUDA graphs (``capture``; CUDA only) or
        run eagerly; decode windows of up to ``window_steps`` steps."""
        self.graphs = None
        self.graphs = DecodeGraphs(self.model, self.k_caches, self.v_caches, sizes=sizes, max_context_len=max_context_len,
                                   block_size=self.block_size, capture=capture, window_steps=window_steps)

    def dummy_inputs(self, num_seqs: int, query_len: int, context_len: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) of a step of ``num_seqs`` sequences, each feeding its last
        ``query_len`` of ``context_len`` tokens (token id 1), their blocks taken round-robin from the
        cache. For warm-up and profiling while the engine is idle: the step writes the cache."""
        bs, dev, n_blocks = self.block_size, self.device, self.k_caches.shape[1]
        width = -(-context_len // bs)
        tables = torch.arange(num_seqs * width, dtype=torch.int64).reshape(num_seqs, width) % n_blocks
        pos = torch.arange(context_len - query_len, context_len).repeat(num_seqs)  # [B * query_len]
        rows = torch.arange(num_seqs).repeat_interleave(query_len)
        slots = tables[rows, pos // bs] * bs + pos % bs
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev),
            block_tables=tables.to(device=dev, dtype=torch.int32),
            cu_seqlens_q=torch.arange(0, (num_seqs + 1) * query_len, query_len, dtype=torch.int32, device=dev),
            context_lens=torch.full((num_seqs,), context_len, dtype=torch.int32, device=dev),
            max_seqlen_q=query_len,
            max_context_len=context_len,
        )
        return torch.ones(num_seqs * query_len, dtype=torch.int64, device=dev), pos.to(dev), meta

    @torch.inference_mode()
    def run_dummy(self, num_seqs: int, query_len: int, context_len: int) -> torch.Tensor:
        """Logits [num_seqs, V] of a :meth:`dummy_inputs` step (each sequence's last token)."""
        ids, positions, meta = self.dummy_inputs(num_seqs, query_len, context_len)
        hidden = self.model.forward(ids, positions, meta, self.k_caches, self.v_caches)
        return self.model.logits(hidden[query_len - 1 :: query_len])

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence's random generator."""
        self._generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.seq_id not in self._generators:
            self._generators[seq.seq_id] = self.sampler.request_generator(seq.params.seed)
        return self._generators[seq.seq_id]

    def _prepare(self, batch: ScheduledBatch) -> _StepInputs:
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        context_lens: list[int] = []
        rows: list[int] = []
        prompt_rows: list[list[tuple[int, int, int]]] = []
        sample_rows: list[int] = []
        for seq, n, samples in zip(batch.seqs, batch.num_new_tokens, batch.sampling):
            start, first = seq.num_computed_tokens, len(ids)
            ids += seq.token_ids[start : start + n]
            for p in range(start, start + n):
                positions.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
            cu_seqlens.append(len(ids))
            context_lens.append(start + n)
            # Row of position p predicts token p + 1: a prompt token while p + 1 < num_prompt_tokens.
            wanted = []
            if seq.params.prompt_logprobs:
                for p in range(start, min(start + n, seq.num_prompt_tokens - 1)):
                    wanted.append((len(rows), p + 1, seq.token_ids[p + 1]))
                    rows.append(first + p - start)
            prompt_rows.append(wanted)
            if samples:  # the last row: never a prompt row, since it predicts a new token
                sample_rows.append(len(rows))
                rows.append(first + n - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            max_seqlen_q=max(batch.num_new_tokens),
            max_context_len=max(context_lens),
        )
        return _StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            rows=rows,
            prompt_rows=prompt_rows,
            sample_rows=sample_rows,
        )

    def _graphable(self, batch: ScheduledBatch) -> bool:
        """True when the padded decode path serves ``batch``: every sequence feeds one token and samples."""
        g = self.graphs
        return (g is not None and len(batch.seqs) <= g.max_batch
                and all(n == 1 for n in batch.num_new_tokens) and all(batch.sampling))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Tokens [S] for the sampling sequences ``seqs`` and their logits [S, V]."""
        dev, params = self.device, [s.params for s in seqs]
        if all(p.temperature == 0 for p in params):
            return greedy_argmax(logits)  # known on the host: no parameter tensors, no device check
        return self.sampler.sample(
            logits,
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            [self._generator(s) for s in seqs],
        )

    @torch.inference_mode()
    def launch_window(self, batch: ScheduledBatch, ahead: int = 0) -> Window:
        """Launch a multi-step decode window (``batch.num_steps`` steps: every sequence decodes
        greedily, its blocks grown for the window) on the padded decode path and return its tokens
        [num_steps][B] as a :class:`~engine.cuda_graphs.Window`, read once for the window.
        ``ahead`` > 0: the window continues a pending one of that many steps of the same sequences,
        launched before the host has its tokens (:meth:`~engine.cuda_graphs.DecodeGraphs.launch_window`)."""
        if not self._graphable(batch):
            raise ValueError("ModelRunner.launch_window: a decode window needs the padded decode path "
                             "(capture_decode_graphs) and a batch of one-token decode steps within its buckets")
        return self.graphs.launch_window(batch.seqs, batch.num_steps, ahead)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        """Run one step of ``batch`` (block tables already grown) and sample."""
        n = len(batch.seqs)
        out = StepOutput([None] * n, [None] * n, [[] for _ in range(n)])
        if self._graphable(batch):
            # Every sequence decodes: logits row i is sequence i's last token, and no row is a prompt row.
            logits = self.graphs.run(batch.seqs)
            prompt_rows: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
            sample_rows = list(range(n))
        else:
            x = self._prepare(batch)
            hidden = self.model.forward(x.input_ids, x.positions, x.meta, self.k_caches, self.v_caches)
            if not x.rows:
                return out
            logits = self.model.logits(hidden[torch.tensor(x.rows, device=self.device)])  # [R, V] float32
            prompt_rows, sample_rows = x.prompt_rows, x.sample_rows
        logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs or s.params.prompt_logprobs for s in batch.seqs) else None
        for i, wanted in enumerate(prompt_rows):
            if wanted:
                values = logprobs[[w[0] for w in wanted], [w[2] for w in wanted]].tolist()
                out.prompt_logprobs[i] = [(w[1], v) for w, v in zip(wanted, values)]
        sampling = [i for i, flag in enumerate(batch.sampling) if flag]
        if sampling:
            # sample_rows increase, so as many as there are logits rows means all of them, in order.
            rows = logits if len(sample_rows) == logits.shape[0] else logits[sample_rows]
            tokens = self._sample([batch.seqs[i] for i in sampling], rows)
            chosen = logprobs[sample_rows, tokens].tolist() if logprobs is not None else None
            for j, (i, token) in enumerate(zip(sampling, tokens.tolist())):
                out.tokens[i] = token
                if batch.seqs[i].params.logprobs:
                    out.logprobs[i] = chosen[j]
        return out
