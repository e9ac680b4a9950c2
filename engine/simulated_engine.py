"""A stand-in for `LLMEngine` with no model: fixed step time, deterministic tokens.

Same interface as `LLMEngine` (add_request / abort / step / has_unfinished / capacity /
stats / tokenizer / config), no torch. The fleet tests and the fleet-scaling benchmark use
it to exercise queueing, batching, streaming and failure handling at a known speed.

Token `index` of a request is `1 + crc32(seed, prompt, index) % (vocab_size - 1)`, so a
resumed request continues with exactly the tokens an uninterrupted one would have produced.
Its text is `f"t{id} "`; EOS (id 0) is emitted only at `eos_at` if that is set.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.outputs import Capacity, FinishReason, StepOutput, TokenOutput, TopToken
from tokenfleet.engine.sampling_params import SamplingParams

__all__ = ["EOS_TOKEN_ID", "SimulatedConfig", "SimulatedEngine", "WhitespaceTokenizer"]

EOS_TOKEN_ID = 0


class WhitespaceTokenizer:
    """One token per whitespace-separated word; `t<id>` words map back to `<id>`."""

    bos_token_id: int | None = None
    add_bos = False

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset({EOS_TOKEN_ID})
        self.all_special_ids = frozenset({EOS_TOKEN_ID})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self._word_id(word) for word in text.split()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.token_text(i) for i in ids)

    def token_text(self, token_id: int) -> str:
        return "" if self.is_special(token_id) else f"t{token_id} "

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [f"t{i}" for i in ids]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.all_special_ids

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        for message in messages:
            if message.get("role") not in {"system", "user", "assistant"}:
                raise ValidationError(f"unknown chat role {message.get('role')!r}")
        text = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        return text + (" <assistant>" if add_generation_prompt else "")

    def _word_id(self, word: str) -> int:
        if word[:1] == "t" and word[1:].isdigit() and 0 < int(word[1:]) < self.vocab_size:
            return int(word[1:])
        return 1 + zlib.crc32(word.encode()) % (self.vocab_size - 1)


@dataclass(frozen=True)
class SimulatedConfig:
    model_name: str = "simulated"
    max_model_len: int = 4096
    vocab_size: int = 32_000


@dataclass
class _Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # generated, including resumed ones
    text: str = ""
    num_blocks: int = 0
    prompt_crc: int = 0  # seeds each token's hash

    def __post_init__(self) -> None:
        self.prompt_crc = zlib.crc32(repr(self.prompt_token_ids).encode())


class SimulatedEngine:
    """Continuous batching over fake tokens: every step, each running sequence gets one."""

    def __init__(self, *, model_name: str = "simulated", max_num_seqs: int = 16,
                 step_time_s: float = 0.02, vocab_size: int = 32_000, max_model_len: int = 4096,
                 num_kv_blocks: int = 4096, block_size: int = 16,
                 eos_at: int | None = None) -> None:
        if max_num_seqs <= 0 or num_kv_blocks <= 0 or block_size <= 0 or vocab_size < 2:
            raise ValueError("max_num_seqs, num_kv_blocks, block_size must be > 0, vocab >= 2")
        self.config = SimulatedConfig(model_name, max_model_len, vocab_size)
        self.tokenizer = WhitespaceTokenizer(vocab_size)
        self.max_num_seqs = max_num_seqs
        self.step_time_s = step_time_s
        self.block_size = block_size
        self.num_total_blocks = num_kv_blocks
        self.num_free_blocks = num_kv_blocks
        self.eos_at = eos_at
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}
        self._aborted: list[_Sequence] = []

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, resume_token_ids: Sequence[int] = ()) -> None:
        """Queue a request; raises ValidationError like LLMEngine does."""
        if not prompt_token_ids:
            raise ValidationError("Input validation error: the prompt is empty")
        if self._find(request_id) is not None:
            raise ValidationError(f"Input validation error: duplicate request id {request_id!r}")
        limit = self.config.max_model_len
        if len(prompt_token_ids) + params.max_new_tokens > limit:
            raise ValidationError(
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
                f"Given: {len(prompt_token_ids)} `inputs` tokens and {params.max_new_tokens} "
                f"`max_new_tokens`")
        resumed = list(resume_token_ids)
        if len(resumed) >= params.max_new_tokens:
            raise ValidationError("resume_token_ids already reach max_new_tokens")
        # Like LLMEngine: the resumed tokens' text is part of generated_text, not re-emitted.
        text = "".join(self.tokenizer.token_text(t) for t in resumed)
        self._waiting.append(_Sequence(request_id, list(prompt_token_ids), params,
                                       token_ids=resumed, text=text))

    def abort(self, request_id: str) -> bool:
        """Stop a request; its `cancelled` StepOutput comes out of the next step()."""
        seq = self._find(request_id)
        if seq is None:
            return False
        if seq.request_id in self._running:
            del self._running[seq.request_id]
            self.num_free_blocks += seq.num_blocks
        else:
            self._waiting.remove(seq)
        self._aborted.append(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    def capacity(self) -> Capacity:
        num_busy = len(self._running) + len(self._waiting)
        return Capacity(
            num_free_seqs=max(0, self.max_num_seqs - num_busy),
            num_free_blocks=self.num_free_blocks,
            num_admissible_tokens=self.num_free_blocks * self.block_size,
            num_waiting=len(self._waiting),
            num_running=len(self._running),
        )

    def stats(self) -> dict[str, float]:
        used = self.num_total_blocks - self.num_free_blocks
        return {
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "num_free_blocks": self.num_free_blocks,
            "num_total_blocks": self.num_total_blocks,
            "kv_usage": used / self.num_total_blocks,
        }

    def step(self) -> list[StepOutput]:
        """Sleep one step time; admit waiting sequences; give each running one a token."""
        if self.step_time_s > 0:
            time.sleep(self.step_time_s)
        outputs = [self._finish(seq, FinishReason.CANCELLED, []) for seq in self._aborted]
        self._aborted.clear()
        self._admit()
        for seq in list(self._running.values()):
            outputs.append(self._advance(seq))
        return outputs

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            total = len(seq.prompt_token_ids) + seq.params.max_new_tokens
            num_blocks = -(-total // self.block_size)
            if num_blocks > self.num_free_blocks:
                break
            self._waiting.popleft()
            seq.num_blocks = num_blocks
            self.num_free_blocks -= num_blocks
            self._running[seq.request_id] = seq

    def _advance(self, seq: _Sequence) -> StepOutput:
        index = len(seq.token_ids)
        token_id = self._token_id(seq, index)
        seq.token_ids.append(token_id)
        text = self.tokenizer.token_text(token_id)
        reason = None
        p = seq.params
        if token_id == EOS_TOKEN_ID:
            reason = FinishReason.EOS_TOKEN
        elif token_id in p.stop_token_ids:
            reason = FinishReason.STOP_SEQUENCE
        released = seq.text + text
        for stop in p.stop:
            cut = released.find(stop, max(0, len(seq.text) - len(stop)))
            if cut >= 0 and len(seq.token_ids) > p.min_new_tokens:
                text = released[len(seq.text):max(cut, len(seq.text))]
                reason = FinishReason.STOP_SEQUENCE
                break
        if reason is None and len(seq.token_ids) >= p.max_new_tokens:
            reason = FinishReason.LENGTH
        seq.text += text
        out = TokenOutput(index=index, id=token_id, text=text, logprob=-0.5,
                          special=self.tokenizer.is_special(token_id),
                          top_tokens=self._top_tokens(token_id, p.top_n_tokens or 0))
        if reason is None:
            return StepOutput(seq.request_id, [out])
        del self._running[seq.request_id]
        self.num_free_blocks += seq.num_blocks
        return self._finish(seq, reason, [out])

    def _finish(self, seq: _Sequence, reason: FinishReason,
                tokens: list[TokenOutput]) -> StepOutput:
        prefill = []
        if seq.params.decoder_input_details:
            prefill = [TokenOutput(index=i, id=t, text=self.tokenizer.token_text(t),
                                   logprob=float("nan") if i == 0 else -1.0, special=False)
                       for i, t in enumerate(seq.prompt_token_ids)]
        return StepOutput(seq.request_id, tokens, finished=True, finish_reason=reason,
                          generated_text=seq.text, num_prompt_tokens=len(seq.prompt_token_ids),
                          num_generated_tokens=len(seq.token_ids), seed=seq.params.seed,
                          prefill=prefill)

    def _token_id(self, seq: _Sequence, index: int) -> int:
        p = seq.params
        if self.eos_at is not None and index == self.eos_at and not p.ignore_eos \
                and index >= p.min_new_tokens:
            return EOS_TOKEN_ID
        key = f"{p.seed if not p.greedy else 'greedy'}:{index}:".encode()
        digest = zlib.crc32(key, seq.prompt_crc)
        return 1 + digest % (self.config.vocab_size - 1)

    def _top_tokens(self, token_id: int, n: int) -> tuple[TopToken, ...]:
        ids = [token_id] + [1 + (token_id + k) % (self.config.vocab_size - 1) for k in range(1, n)]
        return tuple(TopToken(id=i, text=self.tokenizer.token_text(i), logprob=-0.5 - k,
                              special=False) for k, i in enumerate(ids[:n]))

    def _find(self, request_id: str) -> _Sequence | None:
        if request_id in self._running:
            return self._running[request_id]
        return next((s for s in self._waiting if s.request_id == request_id), None)
