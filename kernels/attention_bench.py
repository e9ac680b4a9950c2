"""Time paged attention against torch SDPA on the same data (GPU check, kernel tuning).

    python -m tokenfleet.kernels.attention_bench     (on a GPU)

SDPA runs on the same values in a contiguous [batch, heads, seq, head_dim] layout, so it
reads no block table: it is the bar a paged kernel should get close to. Decode cases report
achieved KV bandwidth (every K and V byte read once), prefill cases TFLOP/s.

On the GPU, decode cases are timed as a decode step runs them: 32 calls captured in one CUDA
graph (ms per call). Timed eagerly, a few-microsecond kernel measures the Python launcher
instead (the split path launches two kernels and allocates its partials): the first H100 run
read 0.129 ms for batch 1 at 8,192 keys. They also sweep the split count, which the engine
fixes at capture for `max_model_len` (16 at batch 1), at the context the batch-1 benchmark
runs (~256 keys) and at 8,192.
`bench_rotary_store_kv` times the fused rotary + KV store against the two kernels it replaces,
32 layers' worth captured in one CUDA graph as a decode step runs them.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tokenfleet.kernels.kv_store import store_kv
from tokenfleet.kernels.paged_attention import paged_attention
from tokenfleet.kernels.paged_batch import make_paged_batch
from tokenfleet.kernels.reference import store_kv_ref
from tokenfleet.kernels.rope_cache import build_cos_sin_cache
from tokenfleet.kernels.rotary import rotary
from tokenfleet.kernels.rotary_store_kv import rotary_store_kv
from tokenfleet.kernels.tile_tuner import capture_graph

__all__ = [
    "GPU_CASES",
    "bench_paged_attention",
    "bench_rotary_store_kv",
    "graph_us_per_call",
    "time_ms",
]

# (name, batch, cached context per sequence, new tokens per sequence)
GPU_CASES = (("decode b1 ctx256", 1, 256, 1), ("decode b1 ctx8192", 1, 8192, 1),
             ("decode b128 ctx1024", 128, 1024, 1), ("prefill 4096", 1, 0, 4096),
             ("prefill 64x128", 64, 0, 128))
DECODE_SPLITS = (1, 2, 4, 8, 16)  # flash-decoding split counts swept for the decode cases
# Prefill tiles tried beside the default (block_m, block_n): the default is not yet tuned
# for Hopper (0.60 ms vs SDPA's 0.27 ms at 4,096 tokens on the H100, 2026-11-26).
PREFILL_TILES = ((64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128))
CPU_CASES = (("decode b2 ctx40", 2, 40, 1),)


def time_ms(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Median ms of `fn` (CUDA events via triton's do_bench); one timed call on the CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def bench_paged_attention(
    device: torch.device | str,
    heads: tuple[int, int, int] = (32, 8, 128),  # num_heads, num_kv_heads, head_dim
    cases: tuple[tuple[str, int, int, int], ...] = GPU_CASES,
) -> list[dict[str, Any]]:
    """One row per case: ours (auto split), ours without split, SDPA; ms and rates."""
    num_heads, num_kv_heads, head_dim = heads
    rows = []
    for name, batch, ctx, q_len in cases:
        b = make_paged_batch(context_lens=(ctx,) * batch, query_lens=(q_len,) * batch,
                             num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             block_size=16, dtype=torch.bfloat16, device=device)
        store_kv_ref(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
        seq = ctx + q_len
        k = torch.randn(batch, num_kv_heads, seq, head_dim, device=device).bfloat16()
        v = torch.randn_like(k)
        q = torch.randn(batch, num_heads, q_len, head_dim, device=device).bfloat16()

        def ours(splits: int | None = None, b: Any = b,
                 tiles: tuple[int, int] | tuple[None, None] = (None, None)) -> torch.Tensor:
            return paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                                   b.seq_lens, head_dim**-0.5, max_query_len=b.max_query_len,
                                   max_seq_len=b.max_seq_len, num_kv_splits=splits,
                                   block_m=tiles[0], block_n=tiles[1])

        def sdpa(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v,
                 causal: bool = q_len > 1) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        kv_bytes = 2 * batch * seq * num_kv_heads * head_dim * 2
        flops = 4 * batch * num_heads * head_dim * (q_len * ctx + q_len * (q_len + 1) / 2)
        on_gpu = torch.device(device).type == "cuda"
        timer = _graph_ms if q_len == 1 and on_gpu else time_ms
        row: dict[str, Any] = {"case": name, "ours_ms": timer(ours, device),
                               "ours_no_split_ms": timer(lambda: ours(1), device),
                               "sdpa_ms": timer(sdpa, device)}
        row["ours_GB_s"] = kv_bytes / row["ours_ms"] / 1e6
        row["ours_TFLOP_s"] = flops / row["ours_ms"] / 1e9
        row["sdpa_over_ours"] = row["sdpa_ms"] / row["ours_ms"]
        if q_len > 1 and on_gpu:
            row["tiles_ms"] = {str(t): _tiles_ms(functools.partial(ours, tiles=t), device)
                               for t in PREFILL_TILES}
        if q_len == 1 and on_gpu:
            row["splits_ms"] = {n: _graph_ms(functools.partial(ours, n), device)
                                for n in DECODE_SPLITS}
        rows.append(row)
    return rows


def _graph_ms(fn: Callable[[], Any], device: torch.device | str) -> float:
    """ms per call of `fn` replayed 32 times in one CUDA graph (a decode step's layers)."""
    return graph_us_per_call([fn] * 32, device) / 1e3


def _tiles_ms(fn: Callable[[], Any], device: torch.device | str) -> float:
    try:  # a tile the card cannot hold (shared memory) is reported, not fatal
        return time_ms(fn, device)
    except Exception:
        return float("nan")


def bench_rotary_store_kv(
    device: torch.device | str,
    heads: tuple[int, int, int] = (32, 8, 128),  # num_heads, num_kv_heads, head_dim
    batches: tuple[int, ...] = (1, 128),
    num_layers: int = 32,
) -> list[dict[str, Any]]:
    """Per layer of a decode step: rotary + store_kv (two launches) vs the fused kernel."""
    num_heads, num_kv_heads, head_dim = heads
    rows = []
    for batch in batches:
        b = make_paged_batch(context_lens=(100,) * batch, query_lens=(1,) * batch,
                             num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             block_size=16, dtype=torch.bfloat16, device=device)
        cos_sin = build_cos_sin_cache(head_dim, b.max_seq_len, 500000.0, None, device=device)

        def two(b: Any = b, cos_sin: torch.Tensor = cos_sin) -> None:
            rotary(b.q, b.k, b.positions, cos_sin)
            store_kv(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)

        def fused(b: Any = b, cos_sin: torch.Tensor = cos_sin) -> None:
            rotary_store_kv(b.q, b.k, b.v, b.positions, cos_sin, b.k_cache, b.v_cache,
                            b.slot_mapping)

        row: dict[str, Any] = {"case": f"rotary+store_kv b{batch}",
                               "two_kernels_us": graph_us_per_call([two] * num_layers, device),
                               "fused_us": graph_us_per_call([fused] * num_layers, device)}
        row["two_over_fused"] = row["two_kernels_us"] / row["fused_us"]
        rows.append(row)
    return rows


def graph_us_per_call(calls: list[Callable[[], Any]], device: torch.device | str) -> float:
    """µs per call of `calls` run in order; on the GPU all of them in one CUDA graph, as a
    captured decode step has its layers' kernels (on the CPU: the first call, timed once)."""
    if torch.device(device).type != "cuda":
        return time_ms(calls[0], device) * 1e3
    return time_ms(capture_graph(calls).replay, device) * 1e3 / len(calls)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU (or run the CPU smoke case through benchmarks/gpu_check.py --dry-run)")
        return 2
    for row in [*bench_paged_attention("cuda"), *bench_rotary_store_kv("cuda")]:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
