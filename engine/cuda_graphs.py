"""CUDA graphs of the decode step, one per batch-size bucket, replayed over padded inputs.

A decode step of b sequences (one new token each) runs at the smallest bucket B >= b of
:func:`batch_buckets` (1, 2, 4, 8, 16, 32, then steps of 32 up to max_num_seqs). Bucket B's graph
was captured once -- after an eager launch that compiled its kernels and resolved their configs --
over static buffers (device tensors that every replay reads):

    input_ids, positions, slot_mapping [Bmax] int64; context_lens [Bmax] int32;
    cu_seqlens_q [Bmax + 1] int32 = 0, 1, ..., Bmax (one query per sequence, never rewritten);
    block_tables [Bmax, ceil(max_model_len / block_size)] int32; window_step [Bmax] int32

and writes logits [B, V] in the model dtype, then picks each row's greedy token and advances the
buffers to the next decode step (see the window below). A step fills rows 0..b-1 from its sequences and pads rows
b..B-1 so that they are harmless: token 0 at position 0, slot -1 (kv_store skips it: nothing is
written) and one cached token (attention reads one finite cache vector through whatever valid
block id the row holds; the row's logits are never read).

Attention resolves its config (tile length, split count) from the longest context of the launch,
and the graph fixes it. So each bucket has a graph per context bucket (:func:`context_buckets`:
powers of two up to the longest context the engine allows, max_model_len, which closes the list), and
a step replays the graph of the smallest context bucket that holds its sequences' contexts to the
end of the window. Context buckets whose configs all match share one graph: a dry run of the
forward pass (``TritonOps.dry_run``) lists each one's configs before anything is captured. (One
graph over every context ran the split count tuned for the longest context at every length: at
max_model_len 2048 a batch-1 step served in 0.877-0.880 ms, against 0.855-0.859 ms with a graph per
context bucket on an H200, results/bench_engine_nvidia_h200/context_buckets/NOTES.md.) Any config
is right at any context: a split covers a share of its sequence's tiles counted at run time.

Block-table rows are kept on the host and rewritten only where they changed: a row remembers the
sequence's block list object and its length (the block manager only appends to a list, and a
preemption gives the sequence a new one), so a step writes the blocks a sequence gained.

A multi-step decode window (:meth:`launch_window`) replays the bucket's graph once a step. The graph
ends with the kernels of ``kernels.greedy_advance``: the logits' chunk maxima, then the pick, which
writes step j's tokens into row j of the static window_tokens [W, Bmax] (window_step counts the
steps on the device, from 0 at each fill) and advances ids, positions, context lengths and slots.
(Outside the graph, those launches cost a batch-1 step about 4 us more on an H200:
results/bench_engine_nvidia_h200/rope_attention/NOTES.md.) A single step (:meth:`run`) reads the
logits; the advance it also makes is overwritten by the next fill. The window's
tokens then go to pinned host memory behind an event, so the host may launch the next window before
it reads them (asynchronous scheduling): a window launched ``ahead`` of a pending one takes its input
ids from the device, where the pending window's last step left them, and its positions, slots and
block tables from the host, which knows them without the pending tokens. The host buffers are
double-buffered on CUDA: a window's copies may still be in flight while the next one is filled.
(One graph for a whole window of 8 steps served slower on an H200, 1.01-1.04 against 0.99-1.00 ms a
step: results/bench_engine_nvidia_h200/prefetch_window/NOTES.md. The host launching the next step's
graph while the GPU runs the current one hides its launch; a graph of 8 steps' ~950 kernels is
launched while the GPU waits.)

Without capture (on a CPU, or to test the padding) the same padded step runs eagerly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

from engine.models.llama import AttentionMetadata, LlamaModel
from engine.sampler import ARGMAX_CHUNKS
from engine.sequence import Sequence
from kernels.greedy_advance import chunk_maxima, greedy_advance


def slot_of(seq: Sequence, position: int, block_size: int) -> int:
    """The flat cache slot of ``seq``'s token at ``position``: block * block_size + offset."""
    return seq.block_table[position // block_size] * block_size + position % block_size


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then every multiple of 32, up to and including ``max_num_seqs``."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_num_seqs]
    sizes += list(range(64, max_num_seqs, 32))
    return sizes + [max_num_seqs]


SHORTEST_CONTEXT_BUCKET = 256
MAX_CONTEXT_BUCKETS = 4


def context_buckets(max_context_len: int) -> list[int]:
    """The context lengths decode graphs are captured at: the powers of two below ``max_context_len``
    from 256 up, at most the 3 largest of them, then ``max_context_len`` itself (e.g. 2048: 256, 512,
    1024, 2048; 300: 256, 300; 160: 160). At most MAX_CONTEXT_BUCKETS, so that an engine allowing
    long contexts keeps its graphs' count (and their logits' memory) bounded."""
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, int) or max_context_len < 1:
        raise ValueError(f"context_buckets: max_context_len must be a positive int, got {max_context_len!r}")
    caps = [max_context_len]
    cap = 1 << ((max_context_len - 1).bit_length() - 1) if max_context_len > 1 else 0
    while cap >= SHORTEST_CONTEXT_BUCKET and len(caps) < MAX_CONTEXT_BUCKETS:
        caps.insert(0, cap)
        cap //= 2
    return caps


@dataclass
class Window:
    """A launched decode window: its greedy tokens [steps, B] (int64; pinned host memory on CUDA,
    filled once ``ready`` has passed)."""

    tokens: torch.Tensor
    ready: torch.cuda.Event | None = None

    def result(self) -> list[list[int]]:
        """The tokens as lists [steps][B], waiting for the window's end on the device."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class DecodeGraphs:
    """Padded decode steps at fixed batch sizes, captured as CUDA graphs when ``capture``."""

    def __init__(
        self,
        model: LlamaModel,
        k_caches: torch.Tensor,
        v_caches: torch.Tensor,
        *,
        sizes: list[int],
        max_context_len: int,
        block_size: int,
        capture: bool,
        window_steps: int = 8,
    ) -> None:
        if capture and k_caches.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the KV cache is on {k_caches.device}")
        self.model, self.k_caches, self.v_caches = model, k_caches, v_caches
        self.sizes = sorted(sizes)
        self.max_context_len = max_context_len
        self.contexts = context_buckets(max_context_len)
        self.block_size = block_size
        dev = k_caches.device
        n, width = self.sizes[-1], -(-max_context_len // block_size)
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.window_step = torch.zeros(n, dtype=torch.int32, device=dev)
        self.window_tokens = torch.zeros(window_steps, n, dtype=torch.int64, device=dev)
        self._device_buffers = (self.ids, self.positions, self.slots, self.context_lens, self.block_tables,
                                self.window_step)
        if dev.type == "cuda":
            # Pinned host copies, sent with asynchronous copies, in two sets used in turn: a window
            # launched ahead of a pending one is filled while the pending one's copies may still be
            # in flight, but the host has waited for the window before that (module docstring). They
            # start as copies of the device buffers: a padding row's block-table row is sent as the
            # host holds it, and uninitialised host memory there once sent garbage block ids, which
            # the padding row's one cached token was then read through (an illegal address on an H200).
            self._host_sets = [tuple(t.cpu().pin_memory() for t in self._device_buffers) for _ in range(2)]
        else:
            self._host_sets = [self._device_buffers]
        self._set = 0
        # Per set and row: the block list object the row holds and how many of its blocks are written.
        self._rows: list[list[tuple[list[int], int] | None]] = [[None] * n for _ in self._host_sets]
        # (batch bucket, context bucket) -> its graph and logits; context buckets that share a graph
        # map to the same pair.
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, batch: int) -> int:
        """The smallest captured batch size that holds ``batch`` sequences."""
        for size in self.sizes:
            if size >= batch:
                return size
        raise ValueError(f"decode batch of {batch} exceeds the largest bucket {self.max_batch}")

    def context_bucket(self, context_len: int) -> int:
        """The smallest context bucket that holds ``context_len`` tokens (the last one beyond it)."""
        for cap in self.contexts:
            if cap >= context_len:
                return cap
        return self.contexts[-1]

    def _meta(self, size: int, cap: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            context_lens=self.context_lens[:size],
            max_seqlen_q=1,
            max_context_len=cap,
        )

    def _forward(self, size: int, cap: int) -> torch.Tensor:
        """Logits [size, V] of the first ``size`` rows of the static buffers, contexts up to ``cap``,
        in the model dtype (the greedy pick reads them as they are, a step converts), then the greedy
        pick and advance."""
        hidden = self.model.forward(self.ids[:size], self.positions[:size], self._meta(size, cap), self.k_caches,
                                    self.v_caches)
        logits = self.model.lm_head(hidden)
        best, where, width = chunk_maxima(logits, math.gcd(logits.shape[1], ARGMAX_CHUNKS))
        greedy_advance(best, where, width, self.window_tokens[:, :size], advance=True, ids=self.ids[:size],
                       positions=self.positions[:size], context_lens=self.context_lens[:size],
                       slots=self.slots[:size], block_tables=self.block_tables[:size], block_size=self.block_size,
                       steps=self.window_step[:size])
        return logits

    def _shared_contexts(self, size: int) -> dict[int, int]:
        """Context bucket -> the largest context bucket whose step of ``size`` rows resolves the same
        configs for every kernel (the dry run of the backend's forward pass); without a dry run
        (the PyTorch backend), every bucket -> the last."""
        dry_run = getattr(self.model.ops, "dry_run", None)
        if dry_run is None:
            return {cap: self.contexts[-1] for cap in self.contexts}
        shared: dict[int, int] = {}
        first_of: dict[tuple[str, ...], int] = {}
        for cap in reversed(self.contexts):
            with dry_run() as resolved:
                self.model.forward(self.ids[:size], self.positions[:size], self._meta(size, cap), self.k_caches,
                                   self.v_caches)
            configs = tuple(json.dumps([r["family"], r["config"]], sort_keys=True) for r in resolved.values())
            shared[cap] = first_of.setdefault(configs, cap)
        return shared

    def _capture(self) -> None:
        """Capture every (batch, context) bucket, largest first, into one memory pool (graphs run one
        at a time); context buckets of the same configs share a graph."""
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.sizes):
                shared = self._shared_contexts(size)
                for cap in sorted(set(shared.values()), reverse=True):
                    self._forward(size, cap)  # compiles kernels and resolves configs outside the capture
                    torch.cuda.synchronize(self.k_caches.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._forward(size, cap)
                    self._graphs[size, cap] = (graph, logits)
                for cap, owner in shared.items():
                    self._graphs[size, cap] = self._graphs[size, owner]
        torch.cuda.synchronize(self.k_caches.device)

    @property
    def num_graphs(self) -> int:
        """How many distinct graphs were captured (0 without capture)."""
        return len({id(graph) for graph, _ in self._graphs.values()})

    def _fill(self, seqs: list[Sequence], size: int, ahead: int = 0) -> int:
        """Write the step's rows (and the padding up to ``size``) into the next host buffer set, then
        send them; return the step's longest context. ``ahead`` > 0: the step follows a pending
        window of that many steps, whose last step left the input ids on the device; every other
        input is known here."""
        self._set = (self._set + 1) % len(self._host_sets)
        host, cache = self._host_sets[self._set], self._rows[self._set]
        ids, positions, slots, ctx, tables, steps = (t.numpy() for t in host)
        bs = self.block_size
        b = len(seqs)
        for i, seq in enumerate(seqs):
            p = seq.num_computed_tokens + ahead
            blocks = seq.block_table
            if not ahead:
                ids[i] = seq.token_ids[p]
            positions[i] = p
            slots[i] = slot_of(seq, p, bs)
            ctx[i] = p + 1
            row = cache[i]
            start = row[1] if row is not None and row[0] is blocks else 0
            if start < len(blocks):
                tables[i, start : len(blocks)] = blocks[start:]
                cache[i] = (blocks, len(blocks))
        steps[:size] = 0
        ids[b:size] = 0
        positions[b:size] = 0
        slots[b:size] = -1
        ctx[b:size] = 1
        if host is not self._device_buffers:
            for dst, src in zip(self._device_buffers, host):
                lo = b if ahead and dst is self.ids else 0  # ahead, the real rows' ids are on the device
                dst[lo:size].copy_(src[lo:size], non_blocking=True)
        return int(ctx[:b].max()) if b else 1

    def _launch(self, size: int, cap: int) -> torch.Tensor:
        if (size, cap) in self._graphs:
            graph, logits = self._graphs[size, cap]
            graph.replay()
            return logits
        return self._forward(size, cap)

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), V] float32 of a decode step of ``seqs`` (each feeding one token)."""
        size = self.bucket(len(seqs))
        cap = self.context_bucket(self._fill(seqs, size))
        return self._launch(size, cap)[: len(seqs)].float()

    def launch_window(self, seqs: list[Sequence], steps: int, ahead: int = 0) -> Window:
        """Launch ``steps`` greedy decode steps of ``seqs`` back to back, their blocks already grown
        for all of them (multi-step decode), and return their tokens [steps, len(seqs)] as a
        :class:`Window` without waiting for them.

        Step 0 is :meth:`run`'s step (``ahead`` > 0: it continues a pending window of ``ahead`` steps
        of the same ``seqs``, see :meth:`_fill`); after every step the device picks the tokens and
        advances the static buffers (input ids take the tokens, positions and context lengths grow
        by one, slots follow the block tables), so nothing waits for the host within the window, and
        a window launched ahead finds its ids where the last step left them."""
        if not 1 <= steps <= self.window_tokens.shape[0]:
            raise ValueError(f"a decode window takes 1 to {self.window_tokens.shape[0]} steps (window_steps), got {steps}")
        b, size = len(seqs), self.bucket(len(seqs))
        cap = self.context_bucket(self._fill(seqs, size, ahead) + steps - 1)  # the window's last step's
        for _ in range(steps):
            self._launch(size, cap)
        tokens = self.window_tokens[:steps, :b]
        if tokens.device.type != "cuda":
            return Window(tokens.clone())  # the buffer serves the next window too
        host = torch.empty(steps, b, dtype=torch.int64, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Window(host, ready)

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> Callable[[], torch.Tensor]:
        """Copy a decode step's device inputs (B sequences, one token each; block tables no wider
        than the buffers) into the static buffers and return the launch of its bucket (and of the
        context bucket of ``meta.max_context_len``): a callable giving logits [bucket, V], for timing
        the step as served (the profiler). Every slot is -1, so that launch after launch repeats the
        same step: the greedy advance moves no row (it would carry the context past the block
        table's rows) and the step stores no K and V (a few hundred bytes a layer);
        ``meta.slot_mapping`` is not read."""
        b, width = meta.block_tables.shape
        size = self.bucket(b)
        self.ids[:b], self.positions[:b] = input_ids, positions
        self.context_lens[:b] = meta.context_lens
        self.block_tables[:b, :width] = meta.block_tables
        self.slots[:size], self.context_lens[b:size] = -1, 1
        for cache in self._rows:  # those rows no longer hold what the row caches remember
            cache[:b] = [None] * b
        cap = self.context_bucket(meta.max_context_len)
        return lambda: self._launch(size, cap)

