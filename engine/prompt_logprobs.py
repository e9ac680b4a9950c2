"""Prompt log-probs (TGI's `decoder_input_details`): which rows of a step need them, and
their values from those rows' logits.

The runner computes the logits of these rows together with the sampled rows' in one LM-head
call (one call the tensor-parallel ranks mirror when the head is split).
"""

from __future__ import annotations

import torch

from tokenfleet.engine.scheduler import ScheduledBatch
from tokenfleet.engine.sequence import Sequence

__all__ = ["PromptTarget", "prompt_logprobs", "prompt_targets"]

# (sequence, row in the step's flat batch, prompt position p + 1, prompt token id at p + 1)
PromptTarget = tuple[Sequence, int, int, int]


def prompt_targets(batch: ScheduledBatch) -> list[PromptTarget]:
    """(seq, row, position p + 1, token id at p + 1) for each prompt row p computed this step
    whose next prompt token's log-prob was asked for (decoder_input_details)."""
    targets: list[PromptTarget] = []
    row = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        if seq.want_prompt_logprobs:
            start = seq.num_computed_tokens
            targets.extend((seq, row + p - start, p + 1, seq.prompt_token_ids[p + 1])
                           for p in range(start, start + n) if p + 1 < seq.num_prompt_tokens)
        row += n
    return targets


def prompt_logprobs(targets: list[PromptTarget], logits: torch.Tensor | None
                     ) -> dict[int, list[tuple[int, float]]]:
    """log p(token[p+1] | tokens[:p+1]) by sequence, from the targets' logits (the first
    len(targets) rows of `logits`)."""
    assert logits is not None
    logp = torch.log_softmax(logits[:len(targets)].float(), -1)  # [P, vocab]
    next_ids = torch.tensor([t[3] for t in targets], device=logp.device)
    picked = logp.gather(1, next_ids[:, None])[:, 0].tolist()
    result: dict[int, list[tuple[int, float]]] = {}
    for (seq, _, position, _), lp in zip(targets, picked, strict=True):
        result.setdefault(id(seq), []).append((position, lp))
    return result
