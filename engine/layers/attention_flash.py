"""Attention backend on the flash-attn package (Tri Dao's CUDA kernels), where it is installed.

Same `forward` as the other backends. New K/V go into the paged cache through our Triton
`store_kv` kernel (flash-attn's own cache append wants contiguous per-sequence caches), then:
  - decode-only steps: `flash_attn_with_kvcache` with the block tables (no host-side lengths,
    so these steps can be captured in CUDA graphs);
  - mixed steps: `flash_attn_varlen_func` with `block_table` over the paged cache, causal
    aligned bottom-right (flash-attn ≥ 2.1), which is exactly our chunked-prefill semantics:
    query row j of a sequence with q_len new tokens and seq_len keys sees keys
    `<= seq_len - q_len + j`.
Sliding window: we keep keys with `query_pos - key_pos < window`, flash-attn's left window is
inclusive, hence `window - 1`. flash-attn reads paged KV only in blocks of a multiple of 256
tokens; EngineConfig checks `block_size` when this backend is chosen.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.kernels.kv_store import store_kv

__all__ = ["FLASH_ATTN_BLOCK_MULTIPLE", "FlashAttentionBackend"]

FLASH_ATTN_BLOCK_MULTIPLE = 256


class FlashAttentionBackend:
    name = "flash_attn"
    supports_cuda_graphs = True  # decode steps use flash_attn_with_kvcache: no host lengths
    fuses_rotary = False

    def __init__(self, flash_attn: Any = None) -> None:
        """`flash_attn`: the module providing the two functions (default: `import flash_attn`)."""
        if flash_attn is None:
            flash_attn = importlib.import_module("flash_attn")
        self._varlen = flash_attn.flash_attn_varlen_func
        self._with_kvcache = flash_attn.flash_attn_with_kvcache

    def decode_launch_config(self, num_seqs: int, num_kv_heads: int, head_dim: int,
                             max_seq_len: int, device: torch.device
                             ) -> AbstractContextManager[None]:
        return nullcontext()  # flash-attn picks its split count on the device side

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
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
        if meta.is_decode_only:
            out = self._with_kvcache(
                q.unsqueeze(1), k_cache, v_cache,  # q [num_seqs, 1, num_heads, head_dim]
                cache_seqlens=meta.seq_lens, block_table=meta.block_tables,
                softmax_scale=scale, causal=True, window_size=window)
            return out.squeeze(1)
        if meta.backend_plan is None:  # shared by every layer of this step
            meta.backend_plan = F.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self._varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=meta.backend_plan,
            max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len,
            softmax_scale=scale, causal=True, window_size=window,
            block_table=meta.block_tables)
