"""Incremental detokenisation: text grows as tokens arrive, multi-byte characters only whole.

Decoding token by token breaks characters whose UTF-8 bytes span several byte-level tokens, and
drops the spaces that some tokenizers attach to the following token. So each step decodes a short
window twice, ``ids[prefix:read]`` (already emitted) and ``ids[prefix:]`` (with the new tokens),
and emits the difference once it no longer ends in an incomplete character (U+FFFD). A few prompt
tokens seed the window, so the first generated token is decoded in context.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Text of one sequence's generated tokens, built token by token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before this are already in self.text
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) <= len(done) or now.endswith(_INCOMPLETE):
            return ""
        delta = now[len(done) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever is pending, an incomplete character included."""
        done = self._decode(self.ids[self.prefix : self.read])
        delta = self._decode(self.ids[self.prefix :])[len(done) :]
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta
