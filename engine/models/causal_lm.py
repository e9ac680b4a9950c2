"""The interface every model offers the model runner."""

from __future__ import annotations

import torch
from torch import nn

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """forward(input_ids [T], positions [T], meta) -> hidden [T, hidden];
    compute_logits(hidden [N, hidden]) -> logits [N, vocab] (only rows that are sampled)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
