"""Grammars to token masks, with llguidance (the structured-output engine vLLM, SGLang and
llama.cpp use): a per-request matcher that follows the generated tokens, and each step's
mask of the tokens that keep the output inside the grammar.

Why llguidance: it compiles a JSON schema or regex lazily against the tokenizer's trie, so a
new request costs about a millisecond (no per-schema automaton over the whole vocabulary, as
outlines builds) and a mask costs tens of microseconds; it is a small wheel with no
dependencies. It is imported only when a request carries a grammar.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.grammar import Grammar

__all__ = ["MAX_CACHED_GRAMMARS", "GrammarCompiler", "first_error_line", "grammar_masks",
           "unpack_bits"]

# JSON without free whitespace: `{"a": 1, "b": [2, 3]}`. Flexible whitespace lets a weak model
# emit newlines until max_new_tokens; a schema can turn it back on with "x-guidance".
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MAX_ERROR_CHARS = 400
# Compiled grammars kept for reuse. Production traffic repeats a few schemas (one per tool set
# or response format): a copy of a compiled matcher costs ~15 us where compiling a 60-field
# schema costs ~15 ms plus ~2 ms for its first mask. A compiled grammar holds its lexer's
# state cache (kilobytes to a few megabytes), so the cache is bounded by count.
MAX_CACHED_GRAMMARS = 64

_executor: Any = None
_executor_lock = threading.Lock()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValidationError(
            "Input validation error: `grammar` needs the llguidance package on the worker "
            "(pip install 'tokenfleet[worker]')") from None
    return llguidance


class GrammarCompiler:
    """One per engine; thread-safe. The tokenizer's llguidance view (~0.3 s for a 49k
    vocabulary) is built at the first grammar, or ahead of it by `warm_up()`. Compiled grammars
    are kept (LRU, `MAX_CACHED_GRAMMARS`): each request gets a copy, so a repeated schema is
    compiled once, and `prepare()` compiles a new one off the engine thread."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int,
                 eos_token_ids: Iterable[int]):
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._unsupported: str | None = None  # why this model cannot take grammars
        self._tokenizer_lock = threading.Lock()  # one build; callers wait for it
        self._compiled: OrderedDict[tuple[bool, str], Any] = OrderedDict()
        self._compiled_lock = threading.Lock()
        self._compiling: dict[tuple[bool, str], threading.Lock] = {}  # key -> its compile
        self.num_compiled = 0  # grammars compiled since start (cache misses)

    def warm_up(self) -> None:
        """Build the tokenizer view in a background thread now (the worker calls this at
        start), so the first grammar request does not stall the engine thread for it."""
        try:
            _llguidance()
        except ValidationError:
            return  # not installed: grammar requests will say so
        threading.Thread(target=self._warm_up, name="grammar-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        with contextlib.suppress(ValidationError):  # kept in _unsupported: requests say so
            self._tokenizer()

    def _tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None and self._unsupported is None:
                try:
                    self._ll_tokenizer = _llguidance().LLTokenizer(
                        self._tokenizer_json(), n_vocab=self._vocab_size,
                        eos_token=self._eos_token_ids or None)
                except ValueError as e:  # e.g. a model vocabulary smaller than its tokenizer's
                    self._unsupported = str(e)
        if self._unsupported is not None:
            raise ValidationError("Input validation error: `grammar` is not available for "
                                  f"this model's tokenizer ({self._unsupported})")
        return self._ll_tokenizer

    def prepare(self, grammar: Grammar) -> None:
        """Compile `grammar` now (or find it in the cache) and attach the result to it, so
        that `matcher()` on the engine thread only copies it, even if many other grammars
        pass through the cache meanwhile. The worker's intake calls this in a thread pool
        (llguidance releases the GIL while it compiles). Raises ValidationError when the
        grammar does not compile."""
        grammar.attach(self._template(grammar))

    def matcher(self, grammar: Grammar, token_ids: Sequence[int] = ()) -> Any:
        """A fresh matcher for `grammar` that has consumed `token_ids` (a resumed request's
        earlier output). Raises ValidationError when the grammar does not compile."""
        template = grammar.compiled
        if template is None:
            template = self._template(grammar)
        matcher = template.deep_copy()
        if token_ids and not matcher.consume_tokens(list(token_ids)):
            raise ValidationError("Input validation error: the request's earlier output does "
                                  "not match its `grammar`")
        return matcher

    def _template(self, grammar: Grammar) -> Any:
        """The cached compiled matcher of `grammar` (never advanced: only copied)."""
        grammar.validate()
        key = (grammar.type == "regex", grammar.text())
        with self._compiled_lock:
            template = self._cached(key)
            if template is not None:
                return template
            key_lock = self._compiling.setdefault(key, threading.Lock())
        # Compiled outside the cache lock, so a long schema does not hold up other grammars;
        # requests for the same new grammar wait for one compile instead of each compiling.
        with key_lock:
            with self._compiled_lock:
                template = self._cached(key)
            if template is not None:
                return template
            try:
                template = self._compile(grammar)
                with self._compiled_lock:
                    self._compiled[key] = template
                    self.num_compiled += 1
                    while len(self._compiled) > MAX_CACHED_GRAMMARS:
                        self._compiled.popitem(last=False)
            finally:  # cached (or failed) before the next request for it can miss
                with self._compiled_lock:
                    self._compiling.pop(key, None)
        return template

    def _cached(self, key: tuple[bool, str]) -> Any:
        template = self._compiled.get(key)
        if template is not None:
            self._compiled.move_to_end(key)
        return template

    def _compile(self, grammar: Grammar) -> Any:
        llg = _llguidance()
        tokenizer = self._tokenizer()
        try:
            if grammar.type == "regex":
                spec = llg.LLMatcher.grammar_from_regex(grammar.value)
            else:
                spec = llg.LLMatcher.grammar_from_json_schema(grammar.schema(),
                                                             defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise _invalid(str(e)) from None
        template = llg.LLMatcher(tokenizer, spec, log_level=0)
        if template.is_error():
            raise _invalid(template.get_error())
        # The first mask builds the lexer states of the grammar's start (~2 ms for a large
        # schema); copies share them, so it is paid here rather than in a decode step.
        template.compute_bitmask()
        if template.is_error():
            raise _invalid(template.get_error())
        return template


def grammar_masks(matchers: Sequence[Any | None], vocab_size: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([g] int64 row numbers, [g, vocab] bool allowed tokens) of the rows that have a
    matcher, on `device`; None when no row has one (rows without a grammar cost nothing).

    A matcher in an error state allows only EOS. On a GPU the packed bitmask (32x smaller)
    crosses the bus and is unpacked there."""
    rows = [row for row, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    num_words = (vocab_size + 31) // 32
    bitmask = torch.full((len(rows), num_words), -1, dtype=torch.int32)  # [g, words]
    _mask_executor().unsafe_compute_mask_ptr(
        [(matchers[row], i) for i, row in enumerate(rows)], bitmask.data_ptr(), num_words * 4,
        len(rows))
    rows_t = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":
        # Bit b of word w is token 32 * w + b: little-endian bytes, least significant bit
        # first. numpy's unpackbits is ~20x faster here than shifts in torch (0.04 vs 1 ms).
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return rows_t, torch.from_numpy(bits[:, :vocab_size]).view(torch.bool)
    packed = bitmask.pin_memory().to(device, non_blocking=True)
    return rows_t.pin_memory().to(device, non_blocking=True), unpack_bits(packed, vocab_size)


def unpack_bits(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[g, words] int32 bitmask -> [g, vocab] bool, in torch ops on the bitmask's device."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [g, words, 32]
    return bits.view(packed.shape[0], -1)[:, :vocab_size].bool()


def _mask_executor() -> Any:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = _llguidance().LLExecutor()
        return _executor


def first_error_line(message: str, default: str) -> str:
    """llguidance's error without the parser dump that follows its first line."""
    lines = message.strip().splitlines()
    return lines[0][:_MAX_ERROR_CHARS] if lines else default


def _invalid(message: str) -> ValidationError:
    return ValidationError("Input validation error: `grammar` "
                           + first_error_line(message, "does not compile"))
