"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, a block table per sequence.

A sequence's token at position p lives in block ``block_table[p // block_size]`` at offset
``p % block_size``. Blocks are taken from the free list as a sequence grows and returned when it
finishes or is preempted. No tensors here: the model runner turns block tables into slot indices.
"""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    """Owns ``num_blocks`` blocks of ``block_size`` token slots each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: list[int | None] = [None] * num_blocks  # seq_id holding each block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks ``seq`` must gain to hold ``num_new_tokens`` more tokens in the cache."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks to ``seq``'s table so its next ``num_new_tokens`` tokens have slots."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"{seq} needs {needed} blocks but {len(self._free)} are free")
        for _ in range(needed):
            block = self._free.popleft()
            self._owner[block] = seq.seq_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` to the free list and forget its cached tokens."""
        for block in seq.block_table:
            if self._owner[block] != seq.seq_id:
                raise RuntimeError(f"block {block} of {seq} is owned by sequence {self._owner[block]}")
            self._owner[block] = None
            self._free.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def check_invariants(self, live: list[Sequence]) -> None:
        """Raise ``AssertionError`` unless the blocks of ``live`` and the free list partition the cache.

        Each block is free or owned by exactly one live sequence, which lists it once; a sequence
        has exactly the blocks its computed tokens need (or more only while a step is in flight).
        """
        free = set(self._free)
        _require(len(free) == len(self._free), "a block is on the free list twice")
        seen: dict[int, int] = {}
        for seq in live:
            for block in seq.block_table:
                _require(block not in seen, f"block {block} is owned by sequences {seen.get(block)} and {seq.seq_id}")
                _require(block not in free, f"block {block} of sequence {seq.seq_id} is also free")
                _require(self._owner[block] == seq.seq_id, f"block {block} of sequence {seq.seq_id} is recorded for {self._owner[block]}")
                seen[block] = seq.seq_id
            _require(len(seq.block_table) >= -(-seq.num_computed_tokens // self.block_size), f"{seq} lacks blocks")
        _require(
            len(seen) + len(free) == self.num_blocks,
            f"{self.num_blocks - len(seen) - len(free)} blocks are neither free nor owned by a live sequence",
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
