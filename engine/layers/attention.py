"""The attention layer: picks a backend once and hands it the paged cache of its layer."""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.layers.attention_torch import TorchAttentionBackend
from tokenfleet.engine.layers.rotary import RopeTable
from tokenfleet.kernels.cpu_paged_decode import CpuPagedDecode

if TYPE_CHECKING:
    from tokenfleet.engine.layers.attention_triton import TritonAttentionBackend

__all__ = ["Attention", "AttentionBackend", "make_backend"]


class AttentionBackend(Protocol):
    name: str
    supports_cuda_graphs: bool  # forward reads no host-side per-step values
    fuses_rotary: bool  # TritonAttentionBackend.forward_rotated: rotary + KV store fused

    def decode_launch_config(self, num_seqs: int, num_kv_heads: int, head_dim: int,
                             max_seq_len: int, device: torch.device
                             ) -> AbstractContextManager[None]:
        """Entered around the capture of a decode graph of `num_seqs` rows."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None) -> torch.Tensor: ...


def make_backend(name: str, device: torch.device,
                 cpu_decode_kernel: CpuPagedDecode | None = None) -> AttentionBackend:
    """`auto` = triton on CUDA, torch on CPU; flash_attn only when asked for by name (our
    Triton kernels are the verified default; flash-attn also needs 256-token KV blocks).
    `cpu_decode_kernel`: the torch backend's decode path on CPU (see attention_torch.py)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend(
            decode_kernel=cpu_decode_kernel if device.type == "cpu" else None)
    if name == "triton":
        from tokenfleet.engine.layers.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValidationError(
                "attention_backend='flash_attn' needs the flash-attn package: "
                "pip install flash-attn (CUDA only), or use 'triton'/'auto'")
        from tokenfleet.engine.layers.attention_flash import FlashAttentionBackend

        return FlashAttentionBackend()
    raise ValidationError(f"unknown attention backend {name!r}")


class Attention(nn.Module):
    """Holds no weights: the K/V caches are bound by the model runner after allocation."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.backend: AttentionBackend = TorchAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, rope: RopeTable | None = None) -> torch.Tensor:
        """Rotary embedding (when `rope` is given), KV store, attention."""
        # q [T, H*D] -> [T, H, D]; k, v [T, KVH*D]; returns [T, H*D]
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if rope is not None and rope.in_kernel and self.backend.fuses_rotary:
            # One kernel rotates q and k and stores K/V: one launch a layer instead of two.
            fused = cast("TritonAttentionBackend", self.backend)
            out = fused.forward_rotated(q, k, v, rope.positions, rope.cos_sin,
                                        self.k_cache, self.v_cache, meta, self.scale,
                                        self.sliding_window)
        else:
            if rope is not None:
                q, k = rope.apply(q, k)
            out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale,
                                       self.sliding_window)
        return out.reshape(T, self.num_heads * self.head_dim)
