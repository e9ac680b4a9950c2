"""Random paged-attention batches laid out as the engine lays them out (tests, GPU checks).

Blocks are handed out in shuffled order, so block tables are non-contiguous; every cache slot
holds random data (never zeros), so a kernel that reads a wrong slot gives a wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PagedBatch", "make_paged_batch"]


@dataclass(slots=True)
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim] this step's new keys
    v: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    max_query_len: int
    max_seq_len: int

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def make_paged_batch(
    *,
    context_lens: Sequence[int],
    query_lens: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
    num_spare_blocks: int = 3,
) -> PagedBatch:
    """A batch where sequence i has `context_lens[i]` cached tokens and `query_lens[i]` new ones.

    The new tokens' K/V are in `k`/`v` (not yet in the cache; `slot_mapping` says where they
    go). `num_spare_blocks` unused blocks stay in the cache as random decoys.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + num_spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables: list[list[int]] = []
    for count in blocks_per_seq:
        tables.append(order[:count])
        order = order[count:]
    max_blocks = max(blocks_per_seq, default=1)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots: list[int] = []
    positions: list[int] = []
    for i, (ctx, seq_len) in enumerate(zip(context_lens, seq_lens, strict=True)):
        block_tables[i, : len(tables[i])] = torch.tensor(tables[i], dtype=torch.int32)
        for pos in range(ctx, seq_len):
            slots.append(tables[i][pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
    num_tokens = len(slots)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    starts = torch.tensor([0, *query_lens], dtype=torch.int64).cumsum(0).to(torch.int32)
    return PagedBatch(
        q=rand(num_tokens, num_heads, head_dim),
        k=rand(num_tokens, num_kv_heads, head_dim),
        v=rand(num_tokens, num_kv_heads, head_dim),
        k_cache=rand(*cache_shape),
        v_cache=rand(*cache_shape),
        block_tables=block_tables.to(device),
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )
