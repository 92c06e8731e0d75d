"""Continuous batching: which sequences run in the next step and how many tokens each feeds.

Each step packs, first come first served, within ``max_num_batched_tokens`` tokens and
``max_num_seqs`` sequences:
1. every running sequence: one token when decoding, or the next chunk of its prompt when its
   prefill did not fit in earlier steps (chunked prefill);
2. then waiting sequences, oldest first, each with as much of its prompt as the budget leaves.
A step whose sequences all decode greedily may run as a window of several decode steps back to
back (multi-step decode, ``schedule(max_decode_steps)``): the model runner feeds each step's
argmax to the next on the device, so the host waits for tokens once a window, not once a step.
While a window runs, the next one of the same sequences may be scheduled before its tokens are
known (``schedule_ahead``, asynchronous scheduling), so that the GPU never waits for the host.
When the KV cache has no block for a running sequence's tokens, the newest running sequence is
preempted: its blocks are freed, it goes back to the front of the waiting queue, and later its
prompt and generated tokens are recomputed. The oldest sequence can always take every block
(a prompt never exceeds the cache), so every request finishes. No tensors here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` feeds its next ``num_new_tokens[i]`` tokens to the model and,
    when ``sampling[i]``, gets a new token sampled from the last one's logits. ``num_steps`` > 1:
    a decode window, every sequence feeding one token a step for that many steps (its blocks grown
    for all of them), each step's token the argmax of the previous step's logits."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    sampling: list[bool] = field(init=False)
    num_steps: int = 1

    def __post_init__(self) -> None:
        self.sampling = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(self.seqs, self.num_new_tokens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    partial_prefills: int = 0  # scheduled chunks that left part of a prefill for later steps
    max_step_tokens: int = 0
    max_step_seqs: int = 0


class Scheduler:
    """Waiting and running queues over a :class:`BlockManager`."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs} and {max_num_batched_tokens}"
            )
        if max_model_len > block_manager.num_blocks * block_manager.block_size:
            raise ValueError(f"max_model_len {max_model_len} exceeds the KV cache's capacity")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens > self.max_model_len:
            raise ValueError(f"sequence of {seq.num_tokens} tokens exceeds max_model_len {self.max_model_len}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def schedule(self, max_decode_steps: int = 1) -> ScheduledBatch:
        """Pick the next step's sequences and token counts; grows their block tables to fit. With
        ``max_decode_steps`` > 1 a batch that only decodes may become a window of up to that many
        steps (see :meth:`_decode_window`)."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_grow(seq, n) and self.running[-1] is not seq:
                self._preempt(self.running.pop())
                preempted = True
            if not bm.can_grow(seq, n):
                self._preempt(self.running.pop())  # seq itself is the newest left
                preempted = True
                break
            bm.grow(seq, n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            i += 1
        # Admitting new work in a step that had to preempt would only preempt it again.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.can_grow(seq, n):
                break
            self.waiting.popleft()
            bm.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        batch = ScheduledBatch(seqs, counts)
        if max_decode_steps > 1 and not preempted:
            batch.num_steps = self._decode_window(batch, max_decode_steps)
        st = self.stats
        st.steps += 1
        st.partial_prefills += batch.sampling.count(False)
        st.max_step_tokens = max(st.max_step_tokens, batch.num_tokens)
        st.max_step_seqs = max(st.max_step_seqs, len(seqs))
        return batch

    def _decode_window(self, batch: ScheduledBatch, limit: int) -> int:
        """How many decode steps ``batch`` runs back to back, its blocks grown for them: 1 unless
        nothing waits (a window would delay its admission), every sequence decodes one token and
        samples greedily without log-probabilities (its next input is an argmax on the device).
        Else the largest k <= ``limit`` that no sequence's length limits cut short (max_tokens,
        max_model_len) and whose blocks are free; a stop token inside a window ends its sequence
        there, and the window's later tokens for it are dropped."""
        seqs = batch.seqs
        if (self.waiting or any(n != 1 for n in batch.num_new_tokens) or not all(batch.sampling)
                or any(s.params.temperature != 0 or s.params.logprobs for s in seqs)):
            return 1
        return max(self._grow_window(seqs, limit, 0), 1)

    def _grow_window(self, seqs: list[Sequence], limit: int, done: int) -> int:
        """The most steps k <= ``limit`` that ``seqs`` can decode after ``done`` steps not yet
        accounted for: within every sequence's max_tokens and max_model_len, and with free blocks
        for all of them; the blocks are grown for done + k steps. 0 when not one step fits."""
        # Step j feeds position num_tokens - 1 + j, which must stay below max_model_len.
        k = min([limit] + [min(s.params.max_tokens - s.num_output_tokens - done,
                               self.max_model_len - s.num_tokens - done + 1) for s in seqs])
        bm = self.block_manager
        while k > 0 and sum(bm.blocks_needed(s, done + k) for s in seqs) > bm.num_free_blocks:
            k -= 1
        if k > 0:
            for s in seqs:
                bm.grow(s, done + k)
        return max(k, 0)

    def schedule_ahead(self, pending: ScheduledBatch, limit: int) -> ScheduledBatch | None:
        """A decode window continuing ``pending``, a window whose tokens are not yet accounted for,
        with the same sequences; its blocks grown. None when something waits (a window delays its
        admission), a sequence of ``pending`` has finished, or its length limits or the free blocks
        leave no step after ``pending``'s. At most ``limit`` steps, as :meth:`_decode_window` gives:
        a stop token inside ``pending`` ends its sequence there, and what the window computed for it
        afterwards is dropped."""
        seqs = pending.seqs
        if self.waiting or any(s.status is not SequenceStatus.RUNNING for s in seqs):
            return None
        k = self._grow_window(seqs, limit, pending.num_steps)
        if k < 1:
            return None
        batch = ScheduledBatch(list(seqs), [1] * len(seqs), num_steps=k)
        self.stats.steps += 1
        return batch

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        """Why ``seq`` stops after appending ``token``: "stop", "length", or None to go on."""
        p = seq.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens > self.max_model_len:
            return "length"
        return None

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Account for a finished step: ``sampled[i]`` is the token drawn for ``batch.seqs[i]``
        (None where it did not sample). Returns the sequences that finished, their blocks freed."""
        finished = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            seq.num_computed_tokens += n
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = self.finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def postprocess_window(self, batch: ScheduledBatch, tokens: list[list[int]]) -> list[Sequence]:
        """Account for a decode window's tokens [num_steps][B] one step at a time, as single steps
        would: a sequence that finishes at step j keeps none of the tokens after it (its blocks,
        grown for the whole window, are freed then). Returns the sequences that finished."""
        finished: list[Sequence] = []
        for row in tokens:
            live = [i for i, seq in enumerate(batch.seqs) if not seq.is_finished]
            if not live:
                break
            step = ScheduledBatch([batch.seqs[i] for i in live], [1] * len(live))
            finished += self.postprocess(step, [row[i] for i in live])
        return finished

    def abort_all(self) -> list[Sequence]:
        """Drop every unfinished sequence, freeing its blocks (after an error inside a step)."""
        dropped = list(self.running) + list(self.waiting)
        for seq in self.running:
            self.block_manager.free(seq)
        self.running.clear()
        self.waiting.clear()
        return dropped
