"""Attention backend on our Triton kernels (`tokenfleet.kernels`): the GPU path.

Same `forward` signature as the torch backend (attention_torch.py); the engine picks one by
name. Each call first writes this step's K/V into the layer's paged cache through
`meta.slot_mapping`, then runs paged attention over the cache for the new query rows, so a
prefill chunk sees its cached context and its own keys causally. `forward_rotated` takes q
and k before the rotary embedding and does rotation and store in one kernel (the CUDA path:
one launch a layer fewer). On a CPU-only machine the kernels run only under
`TRITON_INTERPRET=1` (tests); use the torch backend there otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.kernels.kv_store import store_kv
from tokenfleet.kernels.paged_attention import choose_num_kv_splits, choose_tiles, paged_attention
from tokenfleet.kernels.rotary_store_kv import rotary_store_kv

__all__ = ["TritonAttentionBackend"]


class TritonAttentionBackend:
    """Paged attention for mixed prefill/decode batches on Triton kernels.

    `num_kv_splits` fixes the flash-decoding split count for decode-only steps (None: chosen
    per step from the batch size and `meta.max_seq_len`). When decode steps are captured in CUDA
    graphs, fix it, so that a replay with longer contexts runs the same launch configuration
    (the split arithmetic itself is done on the device and stays correct for any length).
    """

    name = "triton"
    supports_cuda_graphs = True
    fuses_rotary = True

    def __init__(self, num_kv_splits: int | None = None) -> None:
        self.num_kv_splits = num_kv_splits

    @contextmanager
    def decode_launch_config(self, num_seqs: int, num_kv_heads: int, head_dim: int,
                             max_seq_len: int, device: torch.device) -> Iterator[None]:
        """While capturing decode graphs of `num_seqs` rows: a split count fixed for contexts
        up to `max_seq_len` (the device-side split bounds keep shorter ones right)."""
        block_n = choose_tiles(1, head_dim, 1).block_n
        previous = self.num_kv_splits
        self.num_kv_splits = choose_num_kv_splits(num_seqs, num_kv_heads, max_seq_len, block_n,
                                                  device)
        try:
            yield
        finally:
            self.num_kv_splits = previous

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store this step's K/V into the cache, then attend; returns a new tensor."""
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale, sliding_window)

    def forward_rotated(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], not yet rotated
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], not yet rotated
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [num_tokens] int64
        cos_sin: torch.Tensor,  # [max_positions, rotary_dim] float32
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """`forward` with the rotary embedding done by the kernel that stores K/V (q is
        rotated in place; k goes into the cache rotated and stays unrotated itself)."""
        rotary_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale, sliding_window)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        return paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            sliding_window,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            num_kv_splits=self.num_kv_splits if meta.is_decode_only else None,
        )
