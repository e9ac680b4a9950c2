"""The batch layout every attention backend reads (built once per step by ModelRunner).

A step packs the new tokens of all scheduled sequences into one flat batch of `num_tokens`
rows: sequence i owns rows `query_start_loc[i] : query_start_loc[i+1]`. Those rows are the
*last* `q_len_i` positions of its context of `seq_lens[i]` tokens (prefill chunks and decodes
alike; a decode has q_len 1). Query row j of sequence i sits at absolute position
`seq_lens[i] - q_len_i + j` and attends causally to keys at positions `<= ` its own, limited to
the last `sliding_window` positions when the layer has one.

KV cache of one layer: `k_cache`, `v_cache` each [num_blocks, block_size, num_kv_heads, head_dim]
(flash-attn's paged layout). Key at position p of sequence i lives in block
`block_tables[i, p // block_size]`, row `p % block_size`. New keys are written first, through
`slot_mapping` (flat slot = block_id * block_size + row; -1 = do not write), then read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AttentionMetadata"]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32, padded with 0
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length incl. this step's tokens
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool  # every sequence has q_len 1 (the CUDA-graph case)
    # Host copies for backends that loop on the CPU (the torch backend); never read on GPU paths.
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # Per-step precomputation a backend shares across all layers (built by the first layer).
    backend_plan: Any = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
