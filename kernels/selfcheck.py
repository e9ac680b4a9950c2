"""Every kernel against its reference on random data, at given shapes (CPU tests, GPU check).

`run_kernel_checks` never raises for a failing kernel: each check becomes a `CheckResult`
(relative error ‖out − ref‖ / ‖ref‖ in float64 against a per-dtype tolerance, or the exception
text), so one broken kernel does not hide the others on a short GPU lease.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenfleet.kernels import reference
from tokenfleet.kernels.kv_store import store_kv
from tokenfleet.kernels.paged_attention import paged_attention
from tokenfleet.kernels.paged_batch import PagedBatch, make_paged_batch
from tokenfleet.kernels.rms_norm import rms_norm
from tokenfleet.kernels.rope_cache import build_cos_sin_cache
from tokenfleet.kernels.rotary import rotary
from tokenfleet.kernels.rotary_store_kv import rotary_store_kv
from tokenfleet.kernels.row_stats import row_stats
from tokenfleet.kernels.silu_mul import silu_mul

__all__ = [
    "LLAMA3_8B_SHAPE",
    "TINY_SHAPE",
    "CheckResult",
    "CheckShape",
    "rel_err",
    "run_kernel_checks",
]

LLAMA3_8B_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True, slots=True)
class CheckShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    hidden: int
    mixed_context_lens: tuple[int, ...]  # a mixed batch: cached context per sequence ...
    mixed_query_lens: tuple[int, ...]  # ... and new tokens (1 = decode)
    decode_context_lens: tuple[int, ...]  # a decode-only batch (flash-decoding path)
    sliding_window: int


TINY_SHAPE = CheckShape(4, 2, 16, 4, 48, (0, 6, 21), (9, 5, 1), (30, 3), 7)
LLAMA3_8B_SHAPE = CheckShape(
    32, 8, 128, 16, 4096,
    mixed_context_lens=(0, 37, 1000, 3000, 250),
    mixed_query_lens=(512, 300, 1, 1, 1),
    decode_context_lens=(4000, 8191),
    sliding_window=1024,
)

_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    rel_err: float
    tol: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tol  # NaN never passes


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN when `out` has unwritten / non-finite entries)."""
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm().clamp_min(1e-30))


def run_kernel_checks(
    shape: CheckShape, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> list[CheckResult]:
    """Run every kernel check at `shape`; returns one result per check, failures included."""
    tol = _TOLERANCE[dtype]
    checks: list[tuple[str, Callable[[], float]]] = [
        ("store_kv", lambda: _check_store_kv(shape, dtype, device, seed)),
        ("paged_attention mixed", lambda: _check_attention(shape, dtype, device, seed, False)),
        ("paged_attention mixed window",
         lambda: _check_attention(shape, dtype, device, seed, False, shape.sliding_window)),
        ("paged_attention decode auto-split",
         lambda: _check_attention(shape, dtype, device, seed, True)),
        ("paged_attention decode 4 splits window",
         lambda: _check_attention(shape, dtype, device, seed, True, shape.sliding_window, 4)),
        ("rms_norm", lambda: _check_rms_norm(shape, dtype, device, seed, False)),
        ("rms_norm + residual", lambda: _check_rms_norm(shape, dtype, device, seed, True)),
        ("silu_mul", lambda: _check_silu_mul(shape, dtype, device, seed)),
        ("row_stats (argmax + logsumexp)", lambda: _check_row_stats(shape, dtype, device, seed)),
        ("rotary llama3", lambda: _check_rotary(shape, dtype, device, seed)),
        ("rotary + store_kv", lambda: _check_rotary_store_kv(shape, dtype, device, seed)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(CheckResult(f"{name} {_short(dtype)}", check(), tol))
        except Exception as exc:  # a broken kernel is a result, not the end of the run
            results.append(CheckResult(f"{name} {_short(dtype)}", float("nan"), tol, repr(exc)))
    return results


def _batch(shape: CheckShape, dtype: torch.dtype, device: torch.device | str, seed: int,
           decode: bool) -> PagedBatch:
    contexts = shape.decode_context_lens if decode else shape.mixed_context_lens
    queries = (1,) * len(contexts) if decode else shape.mixed_query_lens
    return make_paged_batch(
        context_lens=contexts, query_lens=queries, num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, block_size=shape.block_size,
        dtype=dtype, device=device, seed=seed,
    )


def _check_store_kv(shape: CheckShape, dtype: torch.dtype, device: torch.device | str,
                    seed: int) -> float:
    b = _batch(shape, dtype, device, seed, decode=False)
    b.slot_mapping[::3] = -1  # skipped tokens must leave their slots alone
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    reference.store_kv_ref(b.k, b.v, k_ref, v_ref, b.slot_mapping)
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return max(rel_err(b.k_cache, k_ref), rel_err(b.v_cache, v_ref))


def _check_attention(shape: CheckShape, dtype: torch.dtype, device: torch.device | str,
                     seed: int, decode: bool, window: int | None = None,
                     num_kv_splits: int | None = None) -> float:
    b = _batch(shape, dtype, device, seed, decode)
    reference.store_kv_ref(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    scale = shape.head_dim**-0.5
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens, scale,
            window)
    out = torch.full_like(b.q, float("nan"))  # poisoned: every element must be written
    paged_attention(*args, max_query_len=b.max_query_len, max_seq_len=b.max_seq_len,
                    num_kv_splits=num_kv_splits, out=out)
    return rel_err(out, reference.paged_attention_ref(*args))


def _check_rms_norm(shape: CheckShape, dtype: torch.dtype, device: torch.device | str,
                    seed: int, with_residual: bool) -> float:
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(shape.mixed_query_lens)
    x = torch.randn(num_tokens, shape.hidden, generator=gen).to(dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(shape.hidden, generator=gen)).to(dtype=dtype, device=device)
    residual = torch.randn_like(x) if with_residual else None
    out, new_res = rms_norm(x, weight, 1e-5, residual)
    out_ref, res_ref = reference.rms_norm_ref(x, weight, 1e-5, residual)
    return max(rel_err(out, out_ref), rel_err(new_res, res_ref))


def _check_silu_mul(shape: CheckShape, dtype: torch.dtype, device: torch.device | str,
                    seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    width = 2 * (3 * shape.hidden + 3)  # the intermediate size is no multiple of the block
    gate_up = (torch.randn(7, width, generator=gen) * 3).to(dtype).to(device)
    return rel_err(silu_mul(gate_up), reference.silu_mul_ref(gate_up))


def _check_row_stats(shape: CheckShape, dtype: torch.dtype, device: torch.device | str,
                     seed: int) -> float:
    """The logsumexp's error; NaN (a failure) when any row's argmax differs from torch's."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 32 * shape.hidden + 5  # 131,077 at the 8B shape: many chunks, the last partial
    scores = (torch.randn(7, vocab, generator=gen) * 4).to(dtype).to(device)
    argmax, lse = row_stats(scores)
    want_arg, want_lse = reference.row_stats_ref(scores)
    return rel_err(lse, want_lse) if torch.equal(argmax, want_arg) else float("nan")


def _check_rotary(shape: CheckShape, dtype: torch.dtype, device: torch.device | str,
                  seed: int) -> float:
    b = _batch(shape, dtype, device, seed, decode=False)
    cache = build_cos_sin_cache(shape.head_dim, b.max_seq_len, 500000.0, LLAMA3_8B_ROPE,
                                device=device)
    q_ref, k_ref = reference.rotary_ref(b.q, b.k, b.positions, cache)
    rotary(b.q, b.k, b.positions, cache)
    return max(rel_err(b.q, q_ref), rel_err(b.k, k_ref))


def _check_rotary_store_kv(shape: CheckShape, dtype: torch.dtype,
                           device: torch.device | str, seed: int) -> float:
    b = _batch(shape, dtype, device, seed, decode=False)
    b.slot_mapping[1::4] = -1  # skipped tokens: q still rotates, their slots stay
    cache = build_cos_sin_cache(shape.head_dim, b.max_seq_len, 500000.0, LLAMA3_8B_ROPE,
                                device=device)
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    q_ref = reference.rotary_store_kv_ref(b.q, b.k, b.v, b.positions, cache, k_ref, v_ref,
                                          b.slot_mapping)
    rotary_store_kv(b.q, b.k, b.v, b.positions, cache, b.k_cache, b.v_cache, b.slot_mapping)
    return max(rel_err(b.q, q_ref), rel_err(b.k_cache, k_ref), rel_err(b.v_cache, v_ref))


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
