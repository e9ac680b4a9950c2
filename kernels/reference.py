"""Slow, obviously correct torch versions of every kernel: test oracles and CPU fallbacks.

Everything is computed in float32 and cast back to the input dtype at the end. Shapes and
semantics are those of `tokenfleet.engine.layers.attention_metadata` (paged KV layout
[num_blocks, block_size, num_kv_heads, head_dim]; query rows are the last q_len positions of
each sequence's context; causal; optional sliding window; GQA head h reads kv head
h // (num_heads // num_kv_heads)).
"""

from __future__ import annotations

import torch

__all__ = [
    "norm_gemv_ref",
    "paged_attention_ref",
    "rms_norm_ref",
    "rotary_ref",
    "rotary_store_kv_ref",
    "row_stats_ref",
    "store_kv_ref",
]


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of each sequence's new query rows over its paged context (float32 math)."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        key_pos = torch.arange(seq_len, device=q.device)  # [seq_len]
        slots = block_tables[i, key_pos // block_size].long()  # [seq_len]
        rows = key_pos % block_size
        keys = k_cache[slots, rows].float()  # [seq_len, num_kv_heads, head_dim]
        values = v_cache[slots, rows].float()
        keys = keys.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        values = values.repeat_interleave(group, dim=1)
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # [q_len]
        allowed = key_pos[None, :] <= query_pos[:, None]  # [q_len, seq_len]
        if sliding_window is not None:
            allowed &= (query_pos[:, None] - key_pos[None, :]) < sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), keys) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [num_heads, q_len, seq_len]
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


def store_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Write token t's K/V into flat slot `slot_mapping[t]` of the caches, in place."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, rows = slots // block_size, slots % block_size
    k_cache[blocks, rows] = k[keep].to(k_cache.dtype)
    v_cache[blocks, rows] = v[keep].to(v_cache.dtype)


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:  # (out, new_residual), both [num_tokens, hidden]
    """HF Llama RMSNorm, optionally fused with the residual add that precedes it.

    With a residual: new_residual = x + residual (rounded to x's dtype, as HF adds in the
    model dtype), out = rmsnorm(new_residual). Without: new_residual = x. The normalisation runs
    in float32 and is rounded to the input dtype before the weight multiply, as in HF.
    """
    new_residual = x if residual is None else (x + residual).to(x.dtype)
    h = new_residual.float()
    normed = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (weight.float() * normed.to(x.dtype).float()).to(x.dtype)
    return out, new_residual


def norm_gemv_ref(
    x: torch.Tensor,  # [num_rows, K]
    norm_weight: torch.Tensor | None,  # [K]; None: no norm
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    residual: torch.Tensor | None = None,  # [num_rows, K]
) -> tuple[torch.Tensor, torch.Tensor]:  # (out [num_rows, N], new_residual [num_rows, K])
    """rms_norm_ref (when `norm_weight` is given), then the linear layer on its output
    (float32 products, cast back)."""
    normed, new_residual = (rms_norm_ref(x, norm_weight, eps, residual)
                            if norm_weight is not None else (x, x))
    out = normed.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype), new_residual


def rotary_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim] float32: cos | sin halves
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX / HF-Llama `rotate_half` rotary embedding on the first rotary_dim dims.

    Dims i and i + rotary_dim/2 form a pair rotated by angle positions * inv_freq[i]; dims past
    rotary_dim are left alone. Returns new tensors (the kernel works in place).
    """
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions].float()  # [num_tokens, rotary_dim]
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]  # [num_tokens, 1, half]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half : 2 * half]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated, xf[..., 2 * half :]], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_store_kv_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim] float32
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> torch.Tensor:  # rotated q [num_tokens, num_heads, head_dim]
    """rotary_ref, then store_kv_ref of the rotated k and v; returns the rotated q."""
    q_rot, k_rot = rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's activation: [num_tokens, 2 * I] -> SiLU(first half) * second half."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def row_stats_ref(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax (the first maximal index) and its logsumexp in float32."""
    scores = scores.float()
    return scores.argmax(dim=-1), scores.logsumexp(dim=-1)
