"""The engine's control plane without a model: block manager invariants and scheduler budgets,
chunked prefill, preemption and stop conditions, driven by a fake model that emits random tokens."""
from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def _seq(i: int, n_prompt: int, max_tokens: int = 8, **kw) -> Sequence:
    return Sequence(i, list(range(10, 10 + n_prompt)), SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw))


def _scheduler(num_blocks=16, block_size=4, max_num_seqs=4, max_tokens=16, eos=(), max_model_len=None):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(
        bm,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_tokens,
        max_model_len=max_model_len or num_blocks * block_size,
        eos_token_ids=eos,
    )


def _drive(sched: Scheduler, seqs: list[Sequence], rng: random.Random, token=lambda rng: rng.randrange(100, 200)):
    """Run the scheduler to completion, checking budgets and block invariants at every step."""
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        live = sched.running + list(sched.waiting)
        sched.block_manager.check_invariants(live)
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(batch.seqs) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs), "a sequence scheduled twice in a step"
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            assert n >= 1 and s.num_computed_tokens + n <= s.num_tokens
            assert len(s.block_table) * sched.block_manager.block_size >= s.num_computed_tokens + n
        for s in sched.waiting:
            assert s.block_table == [] and s.num_computed_tokens == 0, "a waiting sequence holds cache"
        sampled = [token(rng) if flag else None for flag in batch.sampling]
        sched.postprocess(batch, sampled)
        steps += 1
        assert steps < 10_000, "the scheduler stopped making progress"
    sched.block_manager.check_invariants([])
    return steps


def test_block_manager_grow_and_free():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = _seq(0, 6), _seq(1, 3)
    assert bm.blocks_needed(a, 6) == 2
    bm.grow(a, 6)
    bm.grow(b, 3)
    assert len(a.block_table) == 2 and len(b.block_table) == 1 and bm.num_free_blocks == 2
    a.num_computed_tokens = 6
    assert bm.blocks_needed(a, 2) == 0 and bm.blocks_needed(a, 3) == 1  # 8 fit in 2 blocks, 9 do not
    assert not bm.can_grow(a, 15)
    bm.check_invariants([a, b])
    with pytest.raises(AssertionError, match="neither free nor owned"):
        bm.check_invariants([a])  # b's block is unaccounted for
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0 and bm.num_free_blocks == 4
    bm.check_invariants([b])
    b.block_table.append(b.block_table[0])
    with pytest.raises(AssertionError, match="owned by sequences"):
        bm.check_invariants([b])


def test_chunked_prefill_respects_token_budget():
    sched = _scheduler(num_blocks=32, max_tokens=8)
    long, short = _seq(0, 21, max_tokens=2), _seq(1, 3, max_tokens=2)
    sched.add(long)
    sched.add(short)
    chunks = []
    for _ in range(3):
        batch = sched.schedule()
        chunks.append(list(zip([s.index for s in batch.seqs], batch.num_new_tokens, batch.sampling)))
        sched.postprocess(batch, [150 if f else None for f in batch.sampling])
    # 21 prompt tokens at 8 per step; the short prompt waits for the budget behind it (FCFS).
    assert chunks[0] == [(0, 8, False)]
    assert chunks[1] == [(0, 8, False)]
    assert chunks[2] == [(0, 5, True), (1, 3, True)]
    assert sched.stats.partial_prefills == 2 and long.num_output_tokens == 1


def test_preempts_newest_and_recomputes():
    # 6 blocks of 4 slots; two sequences of 9 prompt tokens (3 blocks each) fill the cache, so the
    # first decode step that needs a fourth block preempts the newer one.
    sched = _scheduler(num_blocks=6, max_tokens=32)
    old, new = _seq(0, 9, max_tokens=6), _seq(1, 9, max_tokens=6)
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert [s.index for s in batch.seqs] == [0, 1]
    sched.postprocess(batch, [150, 151])
    # Decode steps write positions 9, 10 and 11 into the third block; position 12 needs a fourth.
    for _ in range(3):
        batch = sched.schedule()
        sched.postprocess(batch, [150 if f else None for f in batch.sampling])
    assert sched.stats.preemptions == 0
    batch = sched.schedule()
    assert batch.seqs == [old] and sched.stats.preemptions == 1
    sched.postprocess(batch, [150])
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert old.status is SequenceStatus.RUNNING and len(old.block_table) == 4
    generated = list(new.output_token_ids)
    # Recompute: the preempted sequence later re-feeds its prompt and generated tokens at once.
    while not new.is_finished:
        batch = sched.schedule()
        if new in batch.seqs and new.num_computed_tokens == 0:
            assert batch.num_new_tokens[batch.seqs.index(new)] == new.num_tokens
        sched.postprocess(batch, [150 if f else None for f in batch.sampling])
    assert new.output_token_ids[: len(generated)] == generated and new.num_output_tokens == 6
    sched.block_manager.check_invariants(sched.running + list(sched.waiting))


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_invariants(seed):
    rng = random.Random(seed)
    sched = _scheduler(num_blocks=rng.choice([12, 20, 40]), block_size=rng.choice([1, 3, 4]),
                       max_num_seqs=rng.choice([1, 3, 8]), max_tokens=rng.choice([1, 5, 16]))
    cap = sched.block_manager.num_blocks * sched.block_manager.block_size
    seqs = [_seq(i, rng.randint(1, min(cap, 30)), max_tokens=rng.randint(1, 12)) for i in range(12)]
    _drive(sched, seqs, rng)
    for s in seqs:
        assert s.is_finished and s.block_table == []
        assert s.finish_reason == "length"
        assert s.num_output_tokens == s.params.max_tokens or s.num_tokens > sched.max_model_len


def test_stop_conditions():
    rng = random.Random(0)
    sched = _scheduler(eos=(7,))
    script = iter([5, 7, 5, 9, 5, 5])  # tokens handed out in order
    a = _seq(0, 3, max_tokens=10)  # stops at EOS 7
    _drive(sched, [a], rng, token=lambda _: next(script))
    assert a.output_token_ids == [5, 7] and a.finish_reason == "stop"

    script = iter([5, 7, 5, 9, 5, 5])
    b = _seq(1, 3, max_tokens=10, ignore_eos=True, stop_token_ids=(9,))  # EOS ignored, stops at 9
    _drive(sched, [b], rng, token=lambda _: next(script))
    assert b.output_token_ids == [5, 7, 5, 9] and b.finish_reason == "stop"

    c = _seq(2, 3, max_tokens=3, ignore_eos=True)
    _drive(sched, [c], rng, token=lambda _: 7)
    assert c.output_token_ids == [7, 7, 7] and c.finish_reason == "length"

    # The model's context is full: stop at max_model_len + 1 tokens whatever max_tokens says.
    short = _scheduler(max_model_len=6)
    d = _seq(3, 4, max_tokens=10)
    _drive(short, [d], rng)
    assert d.num_tokens == 7 and d.finish_reason == "length"


def _decoding(sched: Scheduler, *seqs: Sequence) -> None:
    """Admit ``seqs`` and run their prefill (each samples token 1): from here on they decode."""
    for s in seqs:
        sched.add(s)
    batch = sched.schedule(8)
    assert batch.num_steps == 1, "a prefill step became a window"
    sched.postprocess(batch, [1] * len(batch.seqs))


def test_decode_windows_respect_every_limit():
    """schedule(max_decode_steps): a batch that only decodes greedily becomes a window of steps no
    longer than any sequence's remaining tokens (max_tokens, max_model_len) or the free blocks allow,
    its blocks grown for every step; anything waiting, temperature sampling or log-probabilities keep
    single steps."""
    sched = _scheduler(num_blocks=16, block_size=4, max_model_len=40)
    a, b = _seq(0, 3, max_tokens=10), _seq(1, 5, max_tokens=4)
    _decoding(sched, a, b)
    win = sched.schedule(8)
    assert win.num_steps == 3  # b has 3 of its 4 tokens left
    for s in win.seqs:  # blocks for positions up to num_tokens - 1 + 2
        assert len(s.block_table) * 4 >= s.num_tokens + 2
    sched.block_manager.check_invariants(sched.running)
    assert sched.schedule(2).num_steps == 2, "the window exceeds max_decode_steps"
    assert sched.schedule(1).num_steps == 1

    # max_model_len: step j feeds position num_tokens - 1 + j, which must stay below it.
    short = _scheduler(num_blocks=16, block_size=4, max_model_len=7)
    c = _seq(2, 3, max_tokens=20)
    _decoding(short, c)  # 4 tokens: positions 3..6 may be fed
    assert short.schedule(8).num_steps == 4

    # Free blocks: 4 blocks of 4 slots; after the prefill d holds 1 and e 1, so 2 are free. With 3
    # tokens each in the cache, a window of k steps needs ceil((3 + k) / 4) blocks each.
    tight = _scheduler(num_blocks=4, block_size=4)
    d, e = _seq(3, 3, max_tokens=20), _seq(4, 3, max_tokens=20)
    _decoding(tight, d, e)
    assert tight.schedule(8).num_steps == 5  # 2 blocks each, none left
    tight.block_manager.check_invariants(tight.running)

    # Single steps: something waits for a slot; a sampling or log-probability request.
    one = _scheduler(max_num_seqs=1)
    f, g = _seq(5, 3), _seq(6, 3)
    _decoding(one, f)
    one.add(g)
    assert one.schedule(8).num_steps == 1
    for params in (dict(temperature=0.7), dict(logprobs=True)):
        s = _scheduler()
        h = Sequence(7, [10, 11, 12], SamplingParams(max_tokens=8, **{"temperature": 0.0, **params}))
        _decoding(s, h)
        assert s.schedule(8).num_steps == 1, params


def test_schedule_ahead_continues_a_pending_window():
    """schedule_ahead(pending, limit): the next window of the same sequences, scheduled before the
    pending window's tokens are accounted for, counts those tokens against max_tokens,
    max_model_len and the blocks; nothing when a request waits or a sequence has finished."""
    sched = _scheduler(num_blocks=16, block_size=4, max_model_len=40)
    a, b = _seq(0, 3, max_tokens=12), _seq(1, 5, max_tokens=9)
    _decoding(sched, a, b)  # one output token each: a has 11 left, b 8
    win = sched.schedule(4)
    assert win.num_steps == 4
    ahead = sched.schedule_ahead(win, 8)
    assert ahead is not None and ahead.seqs == [a, b] and ahead.num_new_tokens == [1, 1]
    assert ahead.num_steps == 4 and all(ahead.sampling)  # b: 8 left, 4 of them pending
    for s in ahead.seqs:  # blocks for the pending window's 4 steps and the ahead window's 4
        assert len(s.block_table) * 4 >= s.num_computed_tokens + 8
    sched.block_manager.check_invariants(sched.running)
    assert sched.schedule_ahead(win, 2).num_steps == 2, "the window exceeds its limit"

    sched.postprocess_window(win, [[100, 101]] * 4)  # the pending tokens arrive: b has 4 left
    nxt = sched.schedule_ahead(ahead, 8)
    assert nxt is None, "b's max_tokens leaves no step after the pending window"

    # max_model_len: c may feed positions 3..8; a pending window of 4 feeds 3..6.
    short = _scheduler(num_blocks=16, block_size=4, max_model_len=9)
    c = _seq(2, 3, max_tokens=30)
    _decoding(short, c)
    pending = short.schedule(4)
    assert pending.num_steps == 4 and short.schedule_ahead(pending, 8).num_steps == 2

    # Free blocks: 3 blocks of 4 slots; the pending window took 2 for d (3 tokens cached + 5 steps).
    tight = _scheduler(num_blocks=3, block_size=4)
    d = _seq(3, 3, max_tokens=30)
    _decoding(tight, d)
    pending = tight.schedule(5)
    assert pending.num_steps == 5 and len(d.block_table) == 2
    assert tight.schedule_ahead(pending, 8).num_steps == 4  # 12 slots: positions up to 11
    tight.block_manager.check_invariants(tight.running)

    # A waiting request, or a sequence that stopped inside the pending window: no window ahead.
    one = _scheduler(max_num_seqs=2)
    e, f = _seq(4, 3, max_tokens=20), _seq(5, 3, max_tokens=20, stop_token_ids=(7,))
    _decoding(one, e, f)
    pending = one.schedule(4)
    one.add(_seq(6, 3))
    assert one.schedule_ahead(pending, 8) is None
    one.waiting.clear()
    one.postprocess_window(pending, [[100, 7]] + [[101, 102]] * 3)
    assert f.is_finished and one.schedule_ahead(pending, 8) is None


@pytest.mark.parametrize("seed", range(6))
def test_async_windows_random_workload_invariants(seed):
    """LLM.step's control flow with asynchronous scheduling, driven by a fake model: windows, the
    window scheduled ahead of each one, stop tokens (EOS) inside windows, requests arriving while a
    window is pending, and preemption when the cache runs short. After every step each block is
    free or owned once; a sequence scheduled ahead keeps blocks for its pending and ahead steps;
    the tokens a sequence keeps stop at its first EOS or its max_tokens."""
    rng = random.Random(seed)
    sched = _scheduler(num_blocks=rng.choice([10, 24, 60]), block_size=rng.choice([1, 2, 4]),
                       max_num_seqs=rng.choice([4, 8]), max_tokens=rng.choice([4, 16]), eos=(7,))
    cap = sched.block_manager.num_blocks * sched.block_manager.block_size
    seqs = [_seq(i, rng.randint(1, min(cap, 20)), max_tokens=rng.randint(1, 30)) for i in range(10)]
    arrivals = seqs[4:]
    for s in seqs[:4]:
        sched.add(s)
    pending, steps, aheads = None, 0, 0
    while sched.has_unfinished() or arrivals:
        if arrivals and rng.random() < 0.1:
            sched.add(arrivals.pop())
        # As LLM.step: a window scheduled ahead runs as a window, even of one step.
        window = pending is not None
        if window:
            batch, pending = pending, None
        else:
            batch = sched.schedule(rng.choice([2, 4]))
            window = batch.num_steps > 1
        if window:
            pending = sched.schedule_ahead(batch, rng.choice([1, 3, 4]))
            if pending is not None:
                aheads += 1
                bs = sched.block_manager.block_size
                for s in pending.seqs:  # blocks for the pending window's steps and the ahead window's
                    assert len(s.block_table) * bs >= s.num_computed_tokens + batch.num_steps + pending.num_steps
            tokens = [[7 if rng.random() < 0.05 else rng.randrange(100, 200) for _ in batch.seqs]
                      for _ in range(batch.num_steps)]
            sched.postprocess_window(batch, tokens)
            if pending is not None and all(s.is_finished for s in pending.seqs):
                pending = None
        elif batch.seqs:
            sched.postprocess(batch, [rng.choice([7] + list(range(100, 120))) if f else None for f in batch.sampling])
        sched.block_manager.check_invariants(sched.running + list(sched.waiting))
        steps += 1
        assert steps < 10_000, "the scheduler stopped making progress"
    assert pending is None and sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert aheads > 0
    for s in seqs:
        out = s.output_token_ids
        assert s.is_finished and 1 <= len(out) <= s.params.max_tokens
        assert 7 not in out[:-1], "a token kept after the sequence's EOS"
        assert (s.finish_reason == "stop") == (out[-1] == 7)
