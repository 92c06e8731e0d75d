"""A request as the scheduler sees it: its tokens, how many are in the KV cache, its blocks."""
from __future__ import annotations

import enum
import itertools

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One request. ``token_ids`` holds the prompt followed by the generated tokens.

    ``num_computed_tokens`` counts the leading tokens whose K and V are in the cache; the rest are
    fed to the model over the next steps (a prompt chunk, or the one token sampled last step).
    Preemption drops the cache, so the count returns to 0 and the tokens are recomputed.
    """

    def __init__(self, index: int, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.seq_id = next(_ids)
        self.index = index  # position of the request in the caller's list
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float | None] = [None] * self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
