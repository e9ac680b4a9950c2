"""The interface every model offers the model runner."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """forward(input_ids [T], positions [T], meta) -> hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> logits [N, vocab] (only rows that are sampled)."""

    # Tensor parallelism: this rank's logits [N, vocab / size] -> the whole vocabulary's
    # (set by tensor_parallel.shard_vocab; compute_logits applies it).
    gather_logits: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
