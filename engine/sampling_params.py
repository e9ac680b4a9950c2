"""Per-request generation parameters, with TGI's names, defaults and validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.grammar import Grammar

__all__ = ["MAX_LOGIT_BIAS", "MAX_STOP_SEQUENCES", "MAX_TOP_N_TOKENS", "SamplingParams"]

MAX_STOP_SEQUENCES = 16  # TGI's default --max-stop-sequences is 4; we allow more
MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens
MAX_LOGIT_BIAS = 1024  # biased tokens per request (OpenAI allows 300)


@dataclass
class SamplingParams:
    """What to generate and how. Names follow TGI's `GenerateParameters`.

    Greedy when `do_sample` is False and no sampling knob is set, or when `temperature == 0`.
    Setting any of temperature (≠1), top_k, top_p, typical_p or min_p turns sampling on,
    as in TGI.
    """

    max_new_tokens: int = 100
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    truncate: int | None = None
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    ignore_eos: bool = False
    logprobs: bool = True  # logprob of each chosen token (cheap; TGI always sends it)
    # Constrain the output to a JSON schema or regex (TGI's `grammar`; a dict is accepted).
    grammar: Grammar | None = None
    # OpenAI's logit_bias: token id -> value in [-100, 100] added to its logit before
    # penalties and sampling (-100 all but bans a token, +100 all but forces it).
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grammar = Grammar.coerce(self.grammar)
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when the next token is always the argmax of the (penalised) logits."""
        if self.temperature == 0:
            return True
        sampling_knob = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or self.top_p is not None
            or self.typical_p is not None
            or self.min_p is not None
        )
        return not (self.do_sample or sampling_knob)

    def validate(self) -> None:
        """Raise ValidationError with TGI-like messages for out-of-range values."""
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
               "`max_new_tokens` must be strictly positive")
        _check(isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0,
               "`min_new_tokens` must be >= 0")
        _check(self.min_new_tokens <= self.max_new_tokens,
               "`min_new_tokens` must be <= `max_new_tokens`")
        _check(self.temperature is None or self.temperature >= 0,
               "`temperature` must be >= 0")
        _check(self.top_k is None or self.top_k > 0, "`top_k` must be strictly positive")
        _check(self.top_p is None or 0.0 < self.top_p <= 1.0, "`top_p` must be > 0.0 and <= 1.0")
        _check(self.typical_p is None or 0.0 < self.typical_p <= 1.0,
               "`typical_p` must be > 0.0 and <= 1.0")
        _check(self.min_p is None or 0.0 <= self.min_p < 1.0, "`min_p` must be >= 0.0 and < 1.0")
        _check(self.repetition_penalty is None or self.repetition_penalty > 0,
               "`repetition_penalty` must be strictly positive")
        _check(self.frequency_penalty is None or -2.0 <= self.frequency_penalty <= 2.0,
               "`frequency_penalty` must be >= -2.0 and <= 2.0")
        _check(self.presence_penalty is None or -2.0 <= self.presence_penalty <= 2.0,
               "`presence_penalty` must be >= -2.0 and <= 2.0")
        _check(len(self.stop) <= MAX_STOP_SEQUENCES,
               f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. "
               f"Given: {len(self.stop)}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "`stop` sequences must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "`stop_token_ids` must be non-negative integers")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**64),
               "`seed` must be an integer in [0, 2**64)")
        _check(self.truncate is None or self.truncate > 0, "`truncate` must be strictly positive")
        _check(self.top_n_tokens is None or 0 <= self.top_n_tokens <= MAX_TOP_N_TOKENS,
               f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}")
        if self.grammar is not None:
            self.grammar.validate()
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS,
               f"`logit_bias` supports up to {MAX_LOGIT_BIAS} tokens")
        _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                   for t in self.logit_bias), "`logit_bias` keys must be token ids (>= 0)")
        _check(all(isinstance(b, int | float) and -100 <= b <= 100
                   for b in self.logit_bias.values()),
               "`logit_bias` values must be >= -100 and <= 100")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValidationError(f"Input validation error: {message}")
