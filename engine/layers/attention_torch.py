"""Paged attention in plain torch ops: the CPU backend (and the fallback anywhere).

KV is read straight from the paged cache and processed `kv_chunk` keys at a time with an
online softmax (running max and sum, flash-attention style), so the full score matrix of a
long prompt is never built. Decodes (one query row each) are batched across sequences;
prefill chunks are handled per sequence.
"""

from __future__ import annotations

import torch

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata

__all__ = ["TorchAttentionBackend", "store_kv"]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write this step's K/V rows into their cache slots (slot -1 = skip)."""
    # k, v: [T, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_slots, num_kv_heads, head_dim]
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


class TorchAttentionBackend:
    name = "torch"

    def __init__(self, kv_chunk: int = 512):
        self.kv_chunk = kv_chunk

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] -> out [T, H, D]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        lens = meta.seq_lens_cpu
        assert qsl is not None and lens is not None, "torch backend needs host metadata"
        decode_rows = [i for i in range(len(lens)) if qsl[i + 1] - qsl[i] == 1]
        if decode_rows:
            self._decode(q, k_cache, v_cache, meta, decode_rows, scale, sliding_window, out)
        for i in range(len(lens)):
            start, end = qsl[i], qsl[i + 1]
            if end - start > 1:
                out[start:end] = self._prefill_one(
                    q[start:end], k_cache, v_cache, meta.block_tables[i], lens[i], scale,
                    sliding_window)
        return out

    def _gather(self, cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int
                ) -> torch.Tensor:
        """Keys/values at positions [start, end) of sequences, from their blocks."""
        # block_table [S, max_blocks] -> [S, end - start, KVH, D]
        bs = cache.shape[1]
        first, last = start // bs, (end + bs - 1) // bs
        blocks = cache[block_table[:, first:last].long()]  # [S, nb, bs, KVH, D]
        blocks = blocks.flatten(1, 2)
        return blocks[:, start - first * bs : end - first * bs]

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, rows: list[int], scale: float,
                window: int | None, out: torch.Tensor) -> None:
        assert meta.query_start_loc_cpu is not None and meta.seq_lens_cpu is not None
        q_idx = torch.tensor([meta.query_start_loc_cpu[i] for i in rows], device=q.device)
        lens = [meta.seq_lens_cpu[i] for i in rows]
        seq_lens = torch.tensor(lens, device=q.device)  # [S]
        tables = meta.block_tables[rows] if len(rows) != meta.num_seqs else meta.block_tables
        num_kv_heads = k_cache.shape[2]
        qs = q[q_idx]  # [S, H, D]
        S, H, D = qs.shape
        qg = qs.view(S, num_kv_heads, H // num_kv_heads, D).float() * scale  # [S, KVH, G, D]
        lo = 0 if window is None else max(0, min(lens) - window)
        pos_q = seq_lens - 1  # [S]
        acc, m, l_sum = _online_init(qg)
        for start in range(lo, max(lens), self.kv_chunk):
            end = min(start + self.kv_chunk, max(lens))
            kc = self._gather(k_cache, tables, start, end).float()  # [S, C, KVH, D]
            vc = self._gather(v_cache, tables, start, end).float()
            scores = torch.einsum("skgd,sckd->skgc", qg, kc)  # [S, KVH, G, C]
            pos_k = torch.arange(start, end, device=q.device)  # [C]
            mask = pos_k[None, :] <= pos_q[:, None]  # [S, C]
            if window is not None:
                mask &= pos_q[:, None] - pos_k[None, :] < window
            scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
            acc, m, l_sum = _online_update(acc, m, l_sum, scores, vc, "skgc,sckd->skgd")
        out[q_idx] = (acc / l_sum.unsqueeze(-1)).reshape(S, H, D).to(out.dtype)

    def _prefill_one(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_len: int, scale: float,
                     window: int | None) -> torch.Tensor:
        # q [Q, H, D]: the last Q positions of a context of seq_len tokens
        Q, H, D = q.shape
        num_kv_heads = k_cache.shape[2]
        qg = q.view(Q, num_kv_heads, H // num_kv_heads, D).transpose(0, 1).float() * scale
        # qg [KVH, Q, G, D] -> treat KVH as the batch dim
        pos_q = torch.arange(seq_len - Q, seq_len, device=q.device)  # [Q]
        lo = 0 if window is None else max(0, seq_len - Q - window + 1)
        acc, m, l_sum = _online_init(qg)
        table = block_table.unsqueeze(0)
        for start in range(lo, seq_len, self.kv_chunk):
            end = min(start + self.kv_chunk, seq_len)
            kc = self._gather(k_cache, table, start, end)[0].float()  # [C, KVH, D]
            vc = self._gather(v_cache, table, start, end)[0].float()
            scores = torch.einsum("kqgd,ckd->kqgc", qg, kc)  # [KVH, Q, G, C]
            pos_k = torch.arange(start, end, device=q.device)
            mask = pos_k[None, :] <= pos_q[:, None]  # [Q, C]
            if window is not None:
                mask &= pos_q[:, None] - pos_k[None, :] < window
            scores.masked_fill_(~mask[None, :, None, :], float("-inf"))
            acc, m, l_sum = _online_update(acc, m, l_sum, scores, vc, "kqgc,ckd->kqgd")
        out = acc / l_sum.unsqueeze(-1)  # [KVH, Q, G, D]
        return out.transpose(0, 1).reshape(Q, H, D).to(q.dtype)


def _online_init(qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = torch.zeros_like(qg)  # [..., D]
    m = torch.full(qg.shape[:-1], float("-inf"), device=qg.device)  # running max
    l_sum = torch.zeros(qg.shape[:-1], device=qg.device)  # running sum of exp
    return acc, m, l_sum


def _online_update(acc: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor, scores: torch.Tensor,
                   vc: torch.Tensor, pv_eq: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one chunk of scores [..., C] into the running (acc, max, sum)."""
    m_new = torch.maximum(m, scores.amax(-1))
    # A row whose keys so far are all masked has m_new = -inf; keep it finite to avoid NaN.
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(scores - m_safe.unsqueeze(-1))
    correction = torch.exp(m - m_safe)
    l_sum = l_sum * correction + p.sum(-1)
    acc = acc * correction.unsqueeze(-1) + torch.einsum(pv_eq, p, vc)
    return acc, m_new, l_sum
