"""How one request is sampled and when it stops."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Sampling and stopping rules of one request.

    temperature 0 is greedy; otherwise logits are divided by it, restricted to the ``top_k``
    most likely tokens (0: all) and then to the smallest set whose probability reaches ``top_p``,
    and sampled. ``seed`` makes the request's samples reproducible whatever else shares its batch.
    Generation stops after ``max_tokens`` tokens, on an EOS id of the model (unless
    ``ignore_eos``), or on any of ``stop_token_ids``; the stopping token is part of the output.
    ``logprobs`` returns each generated token's log-probability and ``prompt_logprobs`` each
    prompt token's (given the tokens before it), both under the model's distribution before
    temperature, top-k and top-p. ``detokenize`` False leaves the output's text empty (token ids
    only, as Hugging Face ``generate`` returns), sparing the host a decode per generated token.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False
    detokenize: bool = True

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """``ValueError``/``TypeError`` naming the first field that is out of range."""
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"SamplingParams.temperature must be a number, got {self.temperature!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"SamplingParams.top_p must be a number, got {self.top_p!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SamplingParams.{name} must be an int, got {value!r}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 means no limit), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.detokenize, bool):
            raise TypeError(f"SamplingParams.detokenize must be a bool, got {self.detokenize!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"SamplingParams.stop_token_ids must hold ints, got {t!r}")
