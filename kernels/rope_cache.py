"""The cos/sin table that the rotary kernel and `rotary_ref` read.

Layout: `cos_sin_cache[pos] = cat(cos(pos * inv_freq), sin(pos * inv_freq))`, float32,
[max_pos, rotary_dim] with rotary_dim = head_dim: cos in the first half, sin in the second.
`inv_freq` is computed exactly as transformers' `ROPE_INIT_FUNCTIONS` do (same float32 ops in
the same order) for the default, "linear" and "llama3" rope types.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenfleet.kernels.errors import KernelArgumentError

__all__ = ["SUPPORTED_ROPE_TYPES", "build_cos_sin_cache", "rope_inv_freq"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(
    head_dim: int, base: float, rope_scaling: dict[str, Any] | None = None
) -> torch.Tensor:  # [head_dim // 2] float32
    """Inverse frequencies of rotary pairs, with optional HF `rope_scaling`."""
    if head_dim <= 0 or head_dim % 2:
        raise KernelArgumentError(f"head_dim must be a positive even number, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise KernelArgumentError(
        f"rope_scaling type {rope_type!r} not supported (supported: {SUPPORTED_ROPE_TYPES})"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # them interpolated smoothly (same expressions as transformers' _compute_llama3_parameters).
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def build_cos_sin_cache(
    head_dim: int,
    max_pos: int,
    base: float,
    rope_scaling: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # [max_pos, head_dim] float32
    """cos | sin table for positions 0..max_pos-1 (see the module docstring for the layout)."""
    if max_pos <= 0:
        raise KernelArgumentError(f"max_pos must be positive, got {max_pos}")
    inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
    positions = torch.arange(max_pos, dtype=torch.int64).float()  # [max_pos]
    freqs = positions[:, None] * inv_freq[None, :]  # [max_pos, head_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
