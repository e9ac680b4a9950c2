"""Per-row sampling parameters of one step, as batch tensors the `Sampler` reads.

Built once per step from the scheduled sequences. Everything a step does not need is None, so
the sampler skips it: a batch of greedy rows without penalties or banned tokens carries no
tensors at all and takes the fast path (one argmax). The per-row Python loops live here, in
`build`; the sampler itself is loop-free.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from tokenfleet.engine.grammar_compiler import grammar_masks
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.seeded_random import to_int64_seed
from tokenfleet.engine.sequence import Sequence as Seq

__all__ = ["Penalties", "SamplingBatch", "Warping", "needs_history", "reads_tokens_on_host"]

# Per-row "off" values that leave the logits bit-identical, so mixed batches need no masking.
_TOP_P_OFF = -1.0  # the threshold is 1 - top_p: no cumulative probability is <= -1
_TYPICAL_OFF = 2.0  # every cumulative probability is < 2: the cut lands on the last token


@dataclass(slots=True)
class Penalties:
    """Logit penalties over the whole batch (all rows; neutral values where unset)."""

    repetition: torch.Tensor | None  # [n, 1] float32 penalty, 1.0 = off
    seen_mask: torch.Tensor | None  # [n, vocab] bool: token occurs in prompt + generated
    additive: torch.Tensor | None  # [n, vocab] float32: freq * count + presence * (count > 0)


@dataclass(slots=True)
class Warping:
    """The sampled rows (`rows`, None = all rows) and their warpers and random streams.

    Each warper tensor is None when no sampled row uses it; rows that do not use it carry a
    neutral value.
    """

    rows: torch.Tensor | None  # [m] int64 row numbers of the sampled rows in the batch
    seeds: torch.Tensor  # [m] int64 (seed bits as int64)
    indices: torch.Tensor  # [m] int64, index of the token being generated
    temperatures: torch.Tensor | None  # [m, 1] float32
    top_k_index: torch.Tensor | None  # [m, 1] int64: k - 1, clipped to max_top_k - 1
    top_k_on: torch.Tensor | None  # [m, 1] bool
    max_top_k: int
    top_p_thresholds: torch.Tensor | None  # [m, 1] float32: 1 - top_p, -1.0 = off
    typical_masses: torch.Tensor | None  # [m, 1] float32: typical_p, 2.0 = off
    min_p: torch.Tensor | None  # [m, 1] float32, 0.0 = off


@dataclass(slots=True)
class SamplingBatch:
    """What the sampler needs for one step of `num_rows` rows over `vocab_size` tokens."""

    num_rows: int
    vocab_size: int
    max_top_n: int  # top tokens to return per row (max of the rows' top_n_tokens)
    penalties: Penalties | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # ([b] row, [b] token id) set to -inf
    grammar: tuple[torch.Tensor, torch.Tensor] | None  # ([g] rows, [g, vocab] bool allowed)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # ([b] row, [b] id, [b] value)
    warping: Warping | None  # None = every row is greedy

    @property
    def is_greedy_fast_path(self) -> bool:
        """Pure argmax: no penalties, no banned tokens, no grammar, no sampled row."""
        return (self.penalties is None and self.banned is None and self.grammar is None
                and self.bias is None and self.warping is None)

    @classmethod
    def for_sequences(cls, seqs: Sequence[Seq], vocab_size: int, device: torch.device
                      ) -> SamplingBatch:
        """The batch for sampling the next token of each of `seqs` (one row each). A
        sequence listed r times in a row (verifying r - 1 draft tokens) samples its next r
        tokens: its rows take the indices of the tokens they would be, as decode steps
        would, so each row's draw is the one a plain decode makes at that index."""
        offsets = _run_offsets(seqs)
        return cls.build(
            params=[s.params for s in seqs],
            seeds=[s.seed for s in seqs],
            indices=[s.num_output_tokens + k for s, k in zip(seqs, offsets, strict=True)],
            token_histories=[s.token_ids for s in seqs] if needs_history(seqs) else None,
            prompt_lens=[s.num_prompt_tokens for s in seqs],
            banned_token_ids=[_eos_banned(s, k) for s, k in zip(seqs, offsets, strict=True)],
            grammar=grammar_masks([s.grammar_matcher for s in seqs], vocab_size, device),
            vocab_size=vocab_size,
            device=device,
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        indices: Sequence[int],
        token_histories: Sequence[Sequence[int]] | None,
        prompt_lens: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        banned_token_ids: Sequence[Collection[int]] | None = None,
        grammar: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplingBatch:
        """Gather the per-row parameters into tensors on `device`.

        seeds: per row, in [0, 2**64) (rows without a user seed get a random one from the
        engine); indices: per row, the 0-based index of the token being generated;
        token_histories: per row, prompt + generated ids (read only when a row sets a
        penalty); prompt_lens: per row, how many of those ids are the prompt;
        banned_token_ids: per row, ids that must not be chosen (EOS before min_new_tokens);
        grammar: the rows with a grammar and their allowed tokens, on `device`
        (`grammar_masks`).
        """
        num_rows = len(params)
        if not (len(seeds) == len(indices) == len(prompt_lens) == num_rows):
            raise ValueError("params, seeds, indices and prompt_lens must have one entry per row")
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        device = torch.device(device)
        if grammar is not None and tuple(grammar[1].shape) != (len(grammar[0]), vocab_size):
            raise ValueError(f"grammar mask {tuple(grammar[1].shape)} is not "
                             f"[{len(grammar[0])}, {vocab_size}]")
        max_top_n = min(max((p.top_n_tokens or 0 for p in params), default=0), vocab_size)
        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            max_top_n=max_top_n,
            penalties=_build_penalties(params, token_histories, prompt_lens, vocab_size, device),
            banned=_build_banned(banned_token_ids, num_rows, vocab_size, device),
            grammar=grammar,
            bias=_build_bias(params, vocab_size, device),
            warping=_build_warping(params, seeds, indices, vocab_size, device),
        )


def needs_history(seqs: Sequence[Seq]) -> bool:
    """Some row applies a penalty over its token history (which must then be on the host)."""
    return any(s.params.repetition_penalty not in (None, 1.0) or s.params.frequency_penalty
               or s.params.presence_penalty for s in seqs)


def reads_tokens_on_host(seqs: Sequence[Seq]) -> bool:
    """Some row's sampling needs its latest token on the host: a penalty over its history, or
    a grammar whose mask follows each token (so no decode step is queued ahead for it)."""
    return needs_history(seqs) or any(s.grammar_matcher is not None for s in seqs)


def _run_offsets(seqs: Sequence[Seq]) -> list[int]:
    """0 for a sequence's first row, 1, 2, ... for the rows that follow it consecutively."""
    offsets: list[int] = []
    for i, seq in enumerate(seqs):
        offsets.append(offsets[-1] + 1 if i and seqs[i - 1] is seq else 0)
    return offsets


def _eos_banned(seq: Seq, offset: int = 0) -> list[int]:
    """EOS may not be sampled before min_new_tokens (ignore_eos is handled at finish). With a
    grammar too: its mask never allows EOS alone here (a complete grammar ends the request
    when it completes), so some other token is always left. `offset`: a row sampling
    `offset` tokens ahead (a draft's verification)."""
    if seq.num_output_tokens + offset < seq.params.min_new_tokens:
        return list(seq.eos_token_ids)
    return []


def _build_penalties(
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]] | None,
    prompt_lens: Sequence[int],
    vocab_size: int,
    device: torch.device,
) -> Penalties | None:
    rep = [p.repetition_penalty if p.repetition_penalty is not None else 1.0 for p in params]
    freq = [p.frequency_penalty or 0.0 for p in params]
    presence = [p.presence_penalty or 0.0 for p in params]
    any_rep = any(r != 1.0 for r in rep)
    any_additive = any(f != 0.0 for f in freq) or any(p != 0.0 for p in presence)
    if not (any_rep or any_additive):
        return None
    if histories is None or len(histories) != len(params):
        raise ValueError("token_histories (one per row) are required when a penalty is set")
    num_rows = len(params)
    repetition = seen_mask = additive = None
    if any_rep:
        rows, ids = _flatten(histories, [0] * num_rows, [r != 1.0 for r in rep], vocab_size)
        seen_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool)  # [n, vocab]
        seen_mask[rows, ids] = True
        repetition = torch.tensor(rep, dtype=torch.float32).unsqueeze(1).to(device)  # [n, 1]
        seen_mask = seen_mask.to(device)
    if any_additive:
        active = [f != 0.0 or p != 0.0 for f, p in zip(freq, presence, strict=True)]
        rows, ids = _flatten(histories, prompt_lens, active, vocab_size)
        counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32)  # [n, vocab]
        counts.index_put_((rows, ids), torch.ones(len(ids)), accumulate=True)
        freq_t = torch.tensor(freq, dtype=torch.float32).unsqueeze(1)  # [n, 1]
        presence_t = torch.tensor(presence, dtype=torch.float32).unsqueeze(1)  # [n, 1]
        additive = (counts * freq_t + (counts > 0) * presence_t).to(device)  # [n, vocab]
    return Penalties(repetition=repetition, seen_mask=seen_mask, additive=additive)


def _flatten(
    histories: Sequence[Sequence[int]],
    starts: Sequence[int],
    rows_on: Sequence[bool],
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([total] row, [total] id) pairs of history[start:] over the rows that are on."""
    rows: list[int] = []
    ids: list[int] = []
    for row, (history, start, on) in enumerate(zip(histories, starts, rows_on, strict=True)):
        if not on:
            continue
        tail = history[start:]
        rows.extend([row] * len(tail))
        ids.extend(tail)
    ids_t = torch.tensor(ids, dtype=torch.int64)  # [total]
    if len(ids) and not (int(ids_t.min()) >= 0 and int(ids_t.max()) < vocab_size):
        raise ValueError(f"token history holds an id outside [0, {vocab_size})")
    return torch.tensor(rows, dtype=torch.int64), ids_t


def _build_bias(params: Sequence[SamplingParams], vocab_size: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if not any(p.logit_bias for p in params):
        return None
    rows = [row for row, p in enumerate(params) for _ in p.logit_bias]
    ids = [t for p in params for t in p.logit_bias]
    if not all(0 <= t < vocab_size for t in ids):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    values = [float(b) for p in params for b in p.logit_bias.values()]
    return (torch.tensor(rows, dtype=torch.int64).to(device),  # [b]
            torch.tensor(ids, dtype=torch.int64).to(device),  # [b]
            torch.tensor(values, dtype=torch.float32).to(device))  # [b]


def _build_banned(
    banned: Sequence[Collection[int]] | None, num_rows: int, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if banned is None or not any(banned):
        return None
    if len(banned) != num_rows:
        raise ValueError("banned_token_ids must have one entry per row")
    rows = [row for row, ids in enumerate(banned) for _ in ids]
    ids = [i for row_ids in banned for i in row_ids]
    if not all(0 <= i < vocab_size for i in ids):
        raise ValueError(f"banned token ids must be in [0, {vocab_size})")
    rows_t = torch.tensor(rows, dtype=torch.int64).to(device)  # [b]
    return rows_t, torch.tensor(ids, dtype=torch.int64).to(device)  # [b]


def _build_warping(
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    indices: Sequence[int],
    vocab_size: int,
    device: torch.device,
) -> Warping | None:
    rows = [row for row, p in enumerate(params) if not p.greedy]
    if not rows:
        return None
    sampled = [params[row] for row in rows]
    ints = torch.tensor(  # [m, 2]: seed bits, token index
        [[to_int64_seed(seeds[row]), indices[row]] for row in rows], dtype=torch.int64
    ).to(device)
    warping = Warping(
        rows=None if len(rows) == len(params) else torch.tensor(rows, dtype=torch.int64).to(device),
        seeds=ints[:, 0],
        indices=ints[:, 1],
        temperatures=_column([p.temperature or 1.0 for p in sampled], 1.0, device),
        top_k_index=None,
        top_k_on=None,
        max_top_k=0,
        top_p_thresholds=_column(
            [_TOP_P_OFF if p.top_p in (None, 1.0) else 1.0 - p.top_p for p in sampled],
            _TOP_P_OFF,
            device,
        ),
        typical_masses=_column(
            [_TYPICAL_OFF if p.typical_p in (None, 1.0) else p.typical_p for p in sampled],
            _TYPICAL_OFF,
            device,
        ),
        min_p=_column([p.min_p or 0.0 for p in sampled], 0.0, device),
    )
    top_ks = [min(p.top_k, vocab_size) if p.top_k else vocab_size for p in sampled]
    if any(k < vocab_size for k in top_ks):
        # One topk of the largest k serves every row: row r's threshold is its (k_r)-th value.
        warping.max_top_k = max(k for k in top_ks if k < vocab_size)
        warping.top_k_index = torch.tensor(
            [[min(k, warping.max_top_k) - 1] for k in top_ks], dtype=torch.int64
        ).to(device)
        warping.top_k_on = torch.tensor([[k < vocab_size] for k in top_ks]).to(device)
    return warping


def _column(values: list[float], off_value: float, device: torch.device) -> torch.Tensor | None:
    """[m, 1] float32 of the values, or None when every row is at its off value."""
    if all(v == off_value for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).to(device)
