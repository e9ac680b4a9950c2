"""Synthetic workloads for `tokenfleet bench`: length distributions, arrivals, exact prompts.

A workload is a list of `RequestSpec`s drawn from a seed: the prompt length and the output
length of each request (fixed, uniform, or a ShareGPT-like long tail) and its arrival time
(all at once, or a Poisson process at a given rate). `PromptMaker` turns a prompt length
into text that the target model's tokenizer encodes into exactly that many tokens, from
random single-token words, so no two prompts share a prefix (prefix caching would otherwise
flatter the prefill numbers).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "LENGTH_DISTRIBUTIONS",
    "LengthDistribution",
    "PromptMaker",
    "RequestSpec",
    "WorkloadError",
    "arrival_times_s",
    "build_workload",
]

LENGTH_DISTRIBUTIONS: Final = ("fixed", "uniform", "sharegpt")
# ShareGPT conversation lengths are roughly lognormal: a median near the typical length and a
# tail an order of magnitude longer. sigma=1 puts p99 at ~10x the median; clip at 8x.
_SHAREGPT_SIGMA: Final = 1.0
_SHAREGPT_MAX_FACTOR: Final = 8
_MAX_POOL_WORDS: Final = 4096
_LEADING_WORD: Final = re.compile(r" [a-z]{2,12}")  # BPE style: the space starts the word
_TRAILING_WORD: Final = re.compile(r"[a-z][a-z0-9]{0,11} ")  # whitespace-split style


class WorkloadError(ValueError):
    """A workload option is out of range, or no exact prompt can be built for a tokenizer."""


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: `fixed` = `length`; `uniform` = [length·(1-r), length·(1+r)];
    `sharegpt` = lognormal with median `length`, clipped to [1, 8·length]."""

    kind: str
    length: int
    range_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_DISTRIBUTIONS:
            raise WorkloadError(f"length distribution must be one of {LENGTH_DISTRIBUTIONS}, "
                                f"got {self.kind!r}")
        if self.length < 1:
            raise WorkloadError(f"lengths must be >= 1, got {self.length}")
        if not 0 <= self.range_ratio < 1:
            raise WorkloadError(f"range ratio must be in [0, 1), got {self.range_ratio}")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.length
        if self.kind == "uniform":
            low = max(1, round(self.length * (1 - self.range_ratio)))
            high = max(low, round(self.length * (1 + self.range_ratio)))
            return rng.randint(low, high)
        drawn = rng.lognormvariate(math.log(self.length), _SHAREGPT_SIGMA)
        return min(max(1, round(drawn)), _SHAREGPT_MAX_FACTOR * self.length)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: its lengths in tokens and when it is sent."""

    index: int
    prompt_len: int
    output_len: int
    arrival_s: float  # seconds after the benchmark starts


def arrival_times_s(num_requests: int, request_rate: float, rng: random.Random) -> list[float]:
    """Send times: all at 0 for an infinite rate, else a Poisson process (exponential gaps)
    starting at 0."""
    if request_rate <= 0:
        raise WorkloadError(f"request rate must be > 0 (inf = all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    times, now_s = [], 0.0
    for _ in range(num_requests):
        times.append(now_s)
        now_s += rng.expovariate(request_rate)
    return times


def build_workload(num_requests: int, prompt: LengthDistribution, output: LengthDistribution,
                   *, request_rate: float = math.inf, seed: int = 0,
                   max_model_len: int | None = None) -> list[RequestSpec]:
    """Draw `num_requests` requests from `seed`; with `max_model_len`, lengths are clipped so
    that prompt + output fits (the output is shortened first, down to half the context)."""
    if num_requests < 0:
        raise WorkloadError(f"number of requests must be >= 0, got {num_requests}")
    rng = random.Random(seed)
    arrivals = arrival_times_s(num_requests, request_rate, random.Random(seed + 1))
    specs = []
    for i in range(num_requests):
        prompt_len, output_len = prompt.sample(rng), output.sample(rng)
        if max_model_len is not None and prompt_len + output_len > max_model_len:
            output_len = max(min(output_len, max_model_len // 2), max_model_len - prompt_len)
            prompt_len = max(1, max_model_len - output_len)
        specs.append(RequestSpec(i, prompt_len, output_len, arrivals[i]))
    return specs


class PromptMaker:
    """Builds prompt texts that `tokenizer.encode(text)` turns into an exact token count.

    The words are vocabulary entries that encode to themselves alone and carry their word
    boundary (a leading space for byte-level BPE, a trailing one for whitespace tokenizers),
    so a sequence of them tokenizes word by word.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.words = _single_token_words(tokenizer)
        if len(self.words) < 16:
            raise WorkloadError("could not find single-token words in this tokenizer's "
                                "vocabulary to build exact-length prompts")
        probe = self.words[0]
        self._num_special = (len(tokenizer.encode(probe))
                             - len(tokenizer.encode(probe, add_special_tokens=False)))

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        """A prompt of `num_tokens` tokens (counting any BOS the tokenizer adds) and its
        actual token count (equal unless `num_tokens` is below the special tokens' count)."""
        words = [rng.choice(self.words) for _ in range(max(1, num_tokens - self._num_special))]
        for _ in range(4):  # a merge across words is possible in odd vocabularies: adjust
            count = len(self.tokenizer.encode("".join(words)))
            if count == num_tokens or (count > num_tokens and len(words) == 1):
                break
            if count > num_tokens:
                del words[max(1, len(words) - (count - num_tokens)):]
            else:
                words += [rng.choice(self.words) for _ in range(num_tokens - count)]
        text = "".join(words)
        return text, len(self.tokenizer.encode(text))


def _single_token_words(tokenizer: Any) -> list[str]:
    leading: list[str] = []
    trailing: list[str] = []
    for token_id in range(int(tokenizer.vocab_size)):
        text = tokenizer.decode([token_id])
        pool = (leading if _LEADING_WORD.fullmatch(text)
                else trailing if _TRAILING_WORD.fullmatch(text) else None)
        if pool is None or tokenizer.encode(text, add_special_tokens=False) != [token_id]:
            continue
        pool.append(text)
        if len(pool) >= _MAX_POOL_WORDS:
            break
    return leading if len(leading) >= len(trailing) else trailing
