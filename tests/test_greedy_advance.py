"""kernels.greedy_advance, the device half of a decode window's step: in Triton's interpreter on the
CPU, on CUDA with --gpu."""
from __future__ import annotations

import pytest
import torch

from engine.sampler import chunk_maxima
from kernels.greedy_advance import chunk_maxima as chunk_maxima_kernel, greedy_advance


def _buffers(device, rows=5, width=6, block_size=4):
    g = torch.Generator().manual_seed(3)
    tables = torch.stack([torch.randperm(40, generator=g)[:width] for _ in range(rows)]).to(torch.int32)
    positions = torch.tensor([0, 3, 7, 22, 0][:rows], dtype=torch.int64)
    slots = tables[torch.arange(rows), positions // block_size].long() * block_size + positions % block_size
    slots[-1] = -1  # a padding row
    return {"ids": torch.full((rows,), 11, dtype=torch.int64).to(device), "positions": positions.to(device),
            "context_lens": (positions + 1).to(torch.int32).to(device), "slots": slots.to(device),
            "block_tables": tables.to(device)}


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1024, 1000, 96])
def test_greedy_advance_picks_argmax_and_moves_real_rows_only(vocab, logits_dtype, device):
    """Tokens equal torch.argmax, the first of ties included, for 256, 8 and 32 chunks and logits in
    each float dtype (the decode graphs hand over the LM head's output as it is); real rows advance
    one position (ids, positions, context lengths, the slot through the block table, a block
    boundary crossed), the padding row (slot -1) keeps every buffer; without ``advance`` only the
    tokens are written."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g).to(torch.bfloat16).float()
    top = logits.max() + 1
    logits[1, [vocab - 1, 3]] = top
    logits[2, [7, 8]] = top
    logits[3] = 0.0
    logits = logits.to(device=device, dtype=logits_dtype)
    want = logits.argmax(dim=-1)
    bufs = _buffers(device)
    before = {k: v.clone() for k, v in bufs.items()}
    tokens = torch.full((5,), -7, dtype=torch.int64, device=device)
    greedy_advance(*chunk_maxima(logits), tokens, advance=False, block_size=4, **bufs)
    assert torch.equal(tokens, want)
    assert all(torch.equal(bufs[k], before[k]) for k in bufs)
    tokens.fill_(-7)
    greedy_advance(*chunk_maxima(logits), tokens, advance=True, block_size=4, **bufs)
    assert torch.equal(tokens, want)
    p = before["positions"][:4] + 1
    assert torch.equal(bufs["ids"][:4], want[:4])
    assert torch.equal(bufs["positions"][:4], p)
    assert torch.equal(bufs["context_lens"][:4], before["context_lens"][:4] + 1)
    rows = torch.arange(4, device=device)
    assert torch.equal(bufs["slots"][:4], bufs["block_tables"][rows, p // 4].long() * 4 + p % 4)
    assert bufs["slots"][1] // 4 != before["slots"][1] // 4  # position 3 -> 4 crossed into another block
    for k in bufs:
        assert torch.equal(bufs[k][4], before[k][4]), k


def test_greedy_advance_bad_input(device):
    logits = torch.randn(2, 512, device=device)
    bufs = _buffers(device, rows=2)
    best, where, width = chunk_maxima(logits)
    tokens = torch.empty(2, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="context_lens must be torch.int32"):
        greedy_advance(best, where, width, tokens, advance=True, block_size=4,
                       **{**bufs, "context_lens": bufs["context_lens"].long()})
    with pytest.raises(ValueError, match="tokens has shape"):
        greedy_advance(best, where, width, tokens[:1], advance=True, block_size=4, **bufs)
    with pytest.raises(TypeError, match="best has dtype torch.float64"):
        greedy_advance(best.double(), where, width, tokens, advance=True, block_size=4, **bufs)
    with pytest.raises(ValueError, match="block_size"):
        greedy_advance(best, where, width, tokens, advance=True, block_size=0, **bufs)


def test_greedy_advance_counts_window_steps_on_the_device(device):
    """With a step counter, step j's tokens land in row j of tokens [W, R] and the counter grows; a
    counter past W wraps (a profiler replaying a step's graph on and on) instead of writing past the
    buffer. Each row keeps its own count."""
    bufs = _buffers(device)
    steps = torch.tensor([0, 0, 0, 0, 1], dtype=torch.int32, device=device)
    tokens = torch.full((3, 5), -7, dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(0)
    wants = []
    for _ in range(4):
        logits = torch.randn(5, 96, generator=g).to(device)
        wants.append(logits.argmax(dim=-1))
        greedy_advance(*chunk_maxima(logits), tokens, advance=True, block_size=4, steps=steps, **bufs)
    assert steps.tolist() == [4, 4, 4, 4, 5]
    assert torch.equal(tokens[:, :4], torch.stack([wants[3], wants[1], wants[2]])[:, :4])  # step 3 wrapped to row 0
    assert tokens[:, 4].tolist() == [wants[2][4], wants[3][4], wants[1][4]]  # the row that started at 1
    with pytest.raises(ValueError, match=r"tokens \[W, R\] needs W >= 1"):
        greedy_advance(*chunk_maxima(logits), tokens[:0], advance=True, block_size=4, steps=steps, **bufs)
    with pytest.raises(TypeError, match="steps must be torch.int32"):
        greedy_advance(*chunk_maxima(logits), tokens, advance=True, block_size=4, steps=steps.long(), **bufs)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,chunks", [(1024, 256), (1000, 8), (96, 32), (2053, 1), (4100, 2)])
def test_chunk_maxima_kernel_matches_torch_first_maxima(vocab, chunks, logits_dtype, device):
    """kernels.greedy_advance.chunk_maxima against torch.max over the chunks: the maxima and the
    first index of each, with ties inside a chunk and across the 1024-logit tiles of a long chunk
    (2053 and 2050 logits a chunk: three tiles), rows given with a stride."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab + 5, generator=g).to(logits_dtype)[:, :vocab]
    width = vocab // chunks
    top = logits.float().max() + 1
    logits[0, [width - 1, 2, 1]] = top.to(logits_dtype)  # ties in chunk 0, the first at 1
    if width > 1024:
        logits[1, [1500, 1030, 2040 % width]] = top.to(logits_dtype)  # ties in later tiles: 1030 is the first there
    logits = logits.to(device)
    best, where, w = chunk_maxima_kernel(logits, chunks)
    want_best, want_where = logits.reshape(3, chunks, width).max(dim=-1)
    assert w == width and best.dtype == logits_dtype
    assert torch.equal(best, want_best)
    assert torch.equal(where, want_where)
    assert where[0, 0] == 1
    with pytest.raises(ValueError, match="chunks must be a positive int dividing"):
        chunk_maxima_kernel(logits, 7 if vocab % 7 else 11)
