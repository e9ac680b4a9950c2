"""Incremental detokenization: text for each new token, never a broken character.

A token's text is not a function of the token alone: byte-level BPE splits multi-byte
characters over several tokens, and SentencePiece-style decoders drop or add a leading space
depending on what precedes. So each step decodes a short window twice (TGI's and vLLM's
prefix/read-offset algorithm):

    prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted, as context
    new_text    = decode(ids[prefix_offset:])
and emits `new_text[len(prefix_text):]` only when it grew and does not end in U+FFFD (the
replacement character an incomplete UTF-8 sequence decodes to); otherwise it waits for the
next token. The window starts in the prompt's last few tokens so the first generated token
gets its leading space right.

`decode` must be prefix-stable: decoding more ids only appends text. transformers'
`clean_up_tokenization_spaces` is not (" ." becomes "." only once the "." arrives, after the
space was emitted), so hand this class a decode without that clean-up.

Resuming a request (the tokens of an earlier worker): build the detokenizer over the prompt and
`add` the already-generated ids, discarding their text. That replays the earlier state
exactly, including a character whose bytes were split at the resume point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer", "TokenDecoder"]

_REPLACEMENT_CHAR = "\ufffd"
_NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first generated token


class TokenDecoder(Protocol):
    """The two methods of `Tokenizer` the detokenizer needs."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def is_special(self, token_id: int) -> bool: ...


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, one token at a time."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(len(self._ids) - _NUM_CONTEXT_TOKENS, 0)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (by `add` and `flush`)."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that became decodable ("" if none)."""
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            # Decoding with skip_special_tokens drops it anyway; keeping it out of the window
            # keeps the window short. Its text is "" and it changes no neighbour's text.
            return ""
        self._ids.append(token_id)
        return self._advance(allow_incomplete=False)

    def flush(self) -> str:
        """Release text still held back when generation ends (an incomplete character comes
        out as U+FFFD, as a full decode would show it). Returns "" when nothing is held."""
        return self._advance(allow_incomplete=True)

    def _advance(self, allow_incomplete: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text):
            return ""  # nothing visible yet (e.g. the first bytes of a character)
        if new_text.endswith(_REPLACEMENT_CHAR) and not allow_incomplete:
            return ""  # an incomplete character: wait for its remaining bytes
        piece = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(piece)
        return piece

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(
            self._ids[start:end], skip_special_tokens=self._skip_special_tokens
        )
