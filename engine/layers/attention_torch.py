"""Paged attention in plain torch ops: the CPU backend (and the fallback anywhere).

KV is read straight from the paged cache through per-step slot indices and processed
`kv_chunk` keys at a time with an online softmax (running max and sum, flash-attention style),
so the full score matrix of a long prompt is never built. Decodes (one query row each) are
batched across sequences; prefill chunks are handled per sequence. Everything that depends
only on the batch layout (slot indices, masks) is computed once per step, in a plan shared by
every layer: on a CPU the number of small ops, not FLOPs, sets the decode speed.

With a `decode_kernel` (kernels/cpu_paged_decode.c, built when a C compiler is present) the
whole step skips the gather and SDPA: the kernel reads K/V in place through the block tables,
one query row at a time, 2-6x faster per layer for 32 decodes (benchmarks/bench_cpu_attention.py).
A prefill row is a query row too, attending to the keys up to its own position: torch's CPU
flash attention is slow on short prompts (~45 GFLOP/s), and row by row was 2.0-2.6x faster for
prompts of 64-512 tokens, 1.5x at 1,024, and still 1.08x at 4,096, where K/V stop fitting in
L2 (bf16 cache, AVX-512 BF16; measured in one process, and bench_cpu_step_parts.py for a
whole prefill step). Longer prompts, and prompts over an fp32 cache, take the SDPA path.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.kernels.cpu_paged_decode import CpuPagedDecode, check_tables

__all__ = ["TorchAttentionBackend", "store_kv"]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, all_valid: bool | None = None) -> None:
    """Write this step's K/V rows into their cache slots (slot -1 = skip).

    Same semantics as `kernels.reference.store_kv_ref`, with index_copy_ on flat views
    (faster on CPU than advanced indexing). `all_valid`: known per step, saves a check
    per layer."""
    # k, v: [T, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_slots, num_kv_heads, head_dim]
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if all_valid is None:
        all_valid = bool((slot_mapping >= 0).all())
    if not all_valid:
        valid = slot_mapping >= 0
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


@dataclass(slots=True)
class _Chunk:
    slots: torch.Tensor  # [S, C] or [C] flat cache slots of keys start..end (0 where padded)
    mask: torch.Tensor  # broadcastable to the scores: True = attend


# Past this many keys (any sequence of the step) prefill rows go to SDPA, which reuses K/V
# across query rows; the kernel re-reads them per row (parity measured at 4,096).
KERNEL_MAX_PREFILL_CONTEXT = 4096


@dataclass(slots=True)
class _DecodePlan:
    q_idx: torch.Tensor  # [S] rows of the decode queries in the flat batch
    chunks: list[_Chunk]


@dataclass(slots=True)
class _KernelPlan:
    """Query rows of the step for the C kernel: row r attends to the first seq_lens[r] keys
    of its sequence's block table (a prefill row: its own position + 1)."""
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [T] int32
    num_threads: int
    q_idx: torch.Tensor | None = None  # [T] rows of the flat batch it takes; None = all
    row_seqs: torch.Tensor | None = None  # [T] int32 table row of each row; None = row r


@dataclass(slots=True)
class _PrefillPlan:
    start: int  # query rows start:end of the flat batch
    end: int
    chunks: list[_Chunk]  # empty when `fresh`
    # The whole context is this step's rows (no cached prefix, inside the window): attend to
    # this step's k/v directly, causally, with no gather and no mask (~25% faster per prompt).
    fresh: bool = False


@dataclass(slots=True)
class _Plan:
    decode: _DecodePlan | None
    prefills: list[_PrefillPlan]
    all_slots_valid: bool  # no -1 in the slot mapping
    kernel: _KernelPlan | None = None  # the C kernel's rows (then `decode` is None)


class TorchAttentionBackend:
    name = "torch"
    supports_cuda_graphs = False  # plans its chunks from host-side lengths every step
    fuses_rotary = False

    def __init__(self, kv_chunk: int = 1024, decode_kernel: CpuPagedDecode | None = None):
        self.kv_chunk = kv_chunk
        self.decode_kernel = decode_kernel

    def decode_launch_config(self, num_seqs: int, num_kv_heads: int, head_dim: int,
                             max_seq_len: int, device: torch.device
                             ) -> AbstractContextManager[None]:
        return nullcontext()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] -> out [T, H, D]
        plan = meta.backend_plan
        if not isinstance(plan, _Plan):  # first layer of this step builds it
            plan = self.plan(meta, k_cache.shape[0], k_cache.shape[1], sliding_window, q.device,
                             kv_dtype=k_cache.dtype)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, plan.all_slots_valid)
        in_kernel, decode = plan.kernel, plan.decode
        if in_kernel is not None and in_kernel.q_idx is None:  # every row
            return self._kernel_rows(q, k_cache, v_cache, in_kernel, scale, sliding_window)
        if decode is not None and not plan.prefills:
            return self._decode(q, k_cache, v_cache, decode, scale, sliding_window)
        out = torch.empty_like(q)
        if in_kernel is not None and in_kernel.q_idx is not None:
            out[in_kernel.q_idx] = self._kernel_rows(q[in_kernel.q_idx], k_cache, v_cache,
                                                     in_kernel, scale, sliding_window)
        if decode is not None:
            out[decode.q_idx] = self._decode(q[decode.q_idx], k_cache, v_cache, decode, scale,
                                             sliding_window)
        flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_slots, KVH, D]
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        for pre in plan.prefills:
            rows = slice(pre.start, pre.end)
            if pre.fresh:  # its own rows are its whole context: causal, no mask
                out[rows] = _sdpa(q[rows], k[rows], v[rows], None, scale, k_cache.shape[2],
                                  decode=False)
                continue
            out[rows] = self._attend(q[rows], flat_k, flat_v, pre.chunks, scale,
                                     k_cache.shape[2], decode=False)
        return out

    # ---- the math ----------------------------------------------------------------------
    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                decode: _DecodePlan, scale: float, window: int | None) -> torch.Tensor:
        # q [S, H, D], one row per sequence -> [S, H, D]
        return self._attend(q, k_cache.view(-1, *k_cache.shape[2:]),
                            v_cache.view(-1, *v_cache.shape[2:]), decode.chunks, scale,
                            k_cache.shape[2], decode=True)

    def _kernel_rows(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     rows: _KernelPlan, scale: float, window: int | None) -> torch.Tensor:
        # q [T, H, D] -> [T, H, D]
        kernel = self.decode_kernel
        assert kernel is not None
        if torch.compiler.is_compiling():  # dynamo cannot trace ctypes: the opaque custom op
            assert rows.row_seqs is None, "only decode steps are compiled"
            return torch.ops.tokenfleet.cpu_paged_decode(
                str(kernel.library), q, k_cache, v_cache, rows.block_tables, rows.seq_lens,
                scale, window or 0, rows.num_threads)
        return kernel(q, k_cache, v_cache, rows.block_tables, rows.seq_lens, scale, window,
                      rows.num_threads, tables_checked=True, row_seqs=rows.row_seqs)

    def _attend(self, q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor,
                chunks: list[_Chunk], scale: float, num_kv_heads: int, decode: bool
                ) -> torch.Tensor:
        """decode: q [S, H, D], one row per sequence; prefill: q [Q, H, D] of one sequence."""
        n, H, D = q.shape
        if len(chunks) == 1:  # the common case: one fused flash-attention call
            return _sdpa(q, _gather(flat_k, chunks[0].slots), _gather(flat_v, chunks[0].slots),
                         chunks[0].mask, scale, num_kv_heads, decode)
        qg = q.view(n, num_kv_heads, H // num_kv_heads, D).float() * scale  # [n, KVH, G, D]
        s_eq, pv_eq = ("skgd,sckd->skgc", "skgc,sckd->skgd") if decode else \
                      ("qkgd,ckd->qkgc", "qkgc,ckd->qkgd")
        acc = torch.zeros_like(qg)  # [n, KVH, G, D]
        m = torch.full(qg.shape[:-1], float("-inf"), device=q.device)  # running max
        l_sum = torch.zeros(qg.shape[:-1], device=q.device)  # running sum of exp
        for chunk in chunks:
            kc, vc = _gather(flat_k, chunk.slots).float(), _gather(flat_v, chunk.slots).float()
            scores = torch.einsum(s_eq, qg, kc).masked_fill_(~chunk.mask, float("-inf"))
            m_new = torch.maximum(m, scores.amax(-1))
            # Rows with every key so far masked keep m = -inf; use 0 there to avoid NaN.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(scores - m_safe.unsqueeze(-1))
            correction = torch.exp(m - m_safe)
            l_sum = l_sum * correction + p.sum(-1)
            acc = acc * correction.unsqueeze(-1) + torch.einsum(pv_eq, p, vc)
            m = m_new
        return (acc / l_sum.unsqueeze(-1)).reshape(n, H, D).to(q.dtype)

    # ---- the per-step plan ---------------------------------------------------------------
    def plan(self, meta: AttentionMetadata, num_blocks: int, block_size: int,
             window: int | None, device: torch.device, kv_chunk: int | None = None,
             kv_dtype: torch.dtype | None = None) -> _Plan:
        """Build this step's plan and keep it in `meta` for every layer. Called by the first
        layer, or ahead of a compiled decode step (which must not trace this Python);
        `kv_chunk` overrides the backend's chunk length (a compiled step reads the whole
        context as one chunk, so the graph does not change with the number of chunks).
        Prefill rows go to the C kernel only for a bf16 cache (`kv_dtype`) on a CPU with its
        AVX-512 BF16 path: its portable loop was slower than SDPA on them (fp32: 8.4 vs 6.3
        ms for 16 x 128-token prompts)."""
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        assert qsl is not None and lens is not None, "torch backend needs host metadata"
        chunk = kv_chunk or self.kv_chunk
        all_valid = bool((meta.slot_mapping >= 0).all())
        rows = [i for i in range(len(lens)) if qsl[i + 1] - qsl[i] == 1]
        prefill_seqs = [i for i in range(len(lens)) if qsl[i + 1] - qsl[i] > 1]
        kernel, decode = None, None
        if self.decode_kernel is not None:
            check_tables(meta.block_tables, meta.seq_lens, num_blocks, block_size)  # once a step
            prompts_fit = (self.decode_kernel.fast_bf16 and kv_dtype == torch.bfloat16
                           and all(lens[i] <= KERNEL_MAX_PREFILL_CONTEXT for i in prefill_seqs))
            if not prefill_seqs or prompts_fit:
                meta.backend_plan = _Plan(None, [], all_valid, self._kernel_plan(meta))
                return meta.backend_plan
            if rows:  # prompts go to SDPA (long, or no fast path); decodes stay in the kernel
                rows_t = torch.tensor(rows, dtype=torch.int32, device=device)
                kernel = _KernelPlan(meta.block_tables.contiguous(),
                                     meta.seq_lens.index_select(0, rows_t).contiguous(),
                                     torch.get_num_threads(),
                                     torch.tensor([qsl[i] for i in rows], device=device),
                                     row_seqs=rows_t)
        elif rows:
            decode = self._decode_plan(meta, rows, block_size, window, device, chunk)
        prefills = [self._prefill_plan(meta, i, block_size, window, device, chunk)
                    for i in prefill_seqs]
        meta.backend_plan = _Plan(decode, prefills, all_valid, kernel)
        return meta.backend_plan

    def _kernel_plan(self, meta: AttentionMetadata) -> _KernelPlan:
        """Every row of the step."""
        qsl = meta.query_start_loc_cpu
        assert qsl is not None
        num_rows = qsl[-1]
        if num_rows == meta.num_seqs:  # decodes only: a row is a sequence
            return _KernelPlan(meta.block_tables.contiguous(), meta.seq_lens.contiguous(),
                               torch.get_num_threads())
        device = meta.block_tables.device
        q_lens = torch.tensor([qsl[i + 1] - qsl[i] for i in range(meta.num_seqs)],
                              device=device)
        row_seq = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), q_lens)
        ends = torch.tensor(qsl[1:], device=device)  # [S] one past each sequence's last row
        # row r of sequence s sees its keys up to its own position: seq_len - (rows after r)
        rows_after = ends[row_seq] - 1 - torch.arange(num_rows, device=device)
        seq_lens = (meta.seq_lens[row_seq] - rows_after).to(torch.int32)
        # row_seqs is in range by construction (check_tables ran on the tables themselves)
        return _KernelPlan(meta.block_tables.contiguous(), seq_lens, torch.get_num_threads(),
                           row_seqs=row_seq.to(torch.int32))

    def _decode_plan(self, meta: AttentionMetadata, rows: list[int], block_size: int,
                     window: int | None, device: torch.device, kv_chunk: int) -> _DecodePlan:
        assert meta.query_start_loc_cpu is not None and meta.seq_lens_cpu is not None
        q_idx = torch.tensor([meta.query_start_loc_cpu[i] for i in rows], device=device)
        all_rows = len(rows) == meta.num_seqs
        tables = meta.block_tables if all_rows else meta.block_tables[rows]
        lens = [meta.seq_lens_cpu[i] for i in rows]
        seq_lens = torch.tensor(lens, device=device)[:, None]  # [S, 1]
        lo = 0 if window is None else max(0, min(lens) - window)
        chunks = []
        for start in range(lo, max(lens), kv_chunk):
            pos = torch.arange(start, min(start + kv_chunk, max(lens)), device=device)
            mask = pos[None, :] < seq_lens  # [S, C]: key exists (causal for the last row)
            if window is not None:
                mask &= seq_lens - 1 - pos[None, :] < window
            slots = _slots(tables, pos, block_size) * mask  # padded keys read slot 0
            chunks.append(_Chunk(slots, mask[:, None, None, :]))  # mask [S, 1, 1, C]
        return _DecodePlan(q_idx, chunks)

    def _prefill_plan(self, meta: AttentionMetadata, i: int, block_size: int,
                      window: int | None, device: torch.device, kv_chunk: int) -> _PrefillPlan:
        assert meta.query_start_loc_cpu is not None and meta.seq_lens_cpu is not None
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        seq_len = meta.seq_lens_cpu[i]
        if seq_len == end - start and (window is None or seq_len <= window):
            return _PrefillPlan(start, end, [], fresh=True)
        pos_q = torch.arange(seq_len - (end - start), seq_len, device=device)  # [Q]
        lo = 0 if window is None else max(0, seq_len - (end - start) - window + 1)
        chunks = []
        for k_start in range(lo, seq_len, kv_chunk):
            pos_k = torch.arange(k_start, min(k_start + kv_chunk, seq_len), device=device)
            mask = pos_k[None, :] <= pos_q[:, None]  # [Q, C]
            if window is not None:
                mask &= pos_q[:, None] - pos_k[None, :] < window
            slots = _slots(meta.block_tables[i : i + 1], pos_k, block_size)[0]  # [C]
            chunks.append(_Chunk(slots, mask[:, None, None, :]))  # mask [Q, 1, 1, C]
        return _PrefillPlan(start, end, chunks)


def _gather(flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows `slots` ([S, C] or [C]) of a flat cache [num_slots, KVH, D] -> [*slots.shape, KVH, D]
    (index_select on a 1-D index is several times faster than advanced indexing on CPU)."""
    return flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *flat.shape[1:])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float, num_kv_heads: int, decode: bool) -> torch.Tensor:
    """torch's fused CPU flash attention (blocked, online softmax, fp32 accumulation) on one
    gathered chunk. The G query heads sharing a KV head become G query rows of that head."""
    n, H, D = q.shape
    G = H // num_kv_heads
    if decode:
        # q [S, H, D] -> [S, KVH, G, D]; k, v [S, C, KVH, D] -> [S, KVH, C, D]; mask [S,1,1,C]
        out = F.scaled_dot_product_attention(
            q.view(n, num_kv_heads, G, D), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, scale=scale)
        return out.reshape(n, H, D)
    # Prefill of one sequence, in 4-D with GQA done by SDPA: q [Q, H, D] -> [1, H, Q, D];
    # k, v [C, KVH, D] -> [1, KVH, C, D]; mask [Q, 1, 1, C] -> [1, 1, Q, C]. (3-D inputs
    # silently took SDPA's unfused math path: 25% slower on a 128-token prompt.) No mask: a
    # prompt's first chunk against its own k, v, with SDPA's causal mode.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask.view(1, 1, n, -1), is_causal=mask is None,
        scale=scale, enable_gqa=True)  # [1, H, Q, D]
    return out[0].transpose(0, 1)


def _slots(tables: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots [S, C] of key positions `pos` [C] for each block table row."""
    blocks = tables[:, torch.clamp(pos // block_size, max=tables.shape[1] - 1)].long()
    return blocks * block_size + (pos % block_size)[None, :]
