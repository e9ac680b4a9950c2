"""Rotary position embedding (HF Llama "rotate_half" layout), incl. llama3 and linear scaling.

The cos/sin table comes from `tokenfleet.kernels.rope_cache` (one definition of the
frequencies, checked against transformers there). On CUDA the fused Triton kernel rotates q
and k in place; elsewhere plain torch ops do, in float32 like transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenfleet.engine.errors import UnsupportedModelError
from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.rope_cache import build_cos_sin_cache

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given absolute positions, from a precomputed cos/sin cache."""

    cos_sin: torch.Tensor  # [max_positions, head_dim]: cos in the first half, sin in the second

    def __init__(self, head_dim: int, max_positions: int, base: float,
                 scaling: dict[str, Any] | None):
        super().__init__()
        try:
            cache = build_cos_sin_cache(head_dim, max_positions, base, scaling)
        except KeyError as e:
            raise UnsupportedModelError(f"rope_scaling lacks {e}") from None
        except KernelArgumentError as e:
            raise UnsupportedModelError(str(e)) from None
        self.register_buffer("cos_sin", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T]; q [T, num_heads, head_dim]; k [T, num_kv_heads, head_dim]
        if q.is_cuda:
            from tokenfleet.kernels.rotary import rotary

            rotary(q, k, positions, self.cos_sin)  # in place
            return q, k
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, head_dim/2]
        cos = torch.cat((cos, cos), dim=-1)  # [T, 1, head_dim]
        sin = torch.cat((sin, sin), dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
