"""Time norm_gemv against what the engine runs now: our RMSNorm kernel, then cuBLAS (and,
without the norm, our GEMV against cuBLAS alone).

    python -m tokenfleet.kernels.norm_gemv_bench     (on a GPU; gpu_check.py runs it too)

Decode at batch 1, Llama-3-8B shapes: the QKV and gate-up projections, each after a norm; the
down projection after SiLU·mul; the o_proj and down projections as plain GEMVs (where cuBLAS
adds a split-K reduce kernel).
Each side runs `num_layers` layers with their own weights, captured in one CUDA graph, so the
weights come from memory as in a real step and the launch gaps between kernels count. A few
tile configurations of the fused kernel are tried; each one's output is checked against the
baseline's first. Prints µs per layer, the achieved weight bandwidth and the ratio.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tokenfleet.kernels.attention_bench import graph_us_per_call
from tokenfleet.kernels.norm_gemv import GEMV_TILES, norm_gemv, silu_mul_gemv
from tokenfleet.kernels.rms_norm import rms_norm
from tokenfleet.kernels.selfcheck import rel_err
from tokenfleet.kernels.silu_mul import silu_mul

__all__ = ["GPU_CASES", "bench_norm_gemv"]

# name, N, K, prologue: "norm" (vs our RMSNorm + cuBLAS), "silu_mul" (vs our SiLU·mul +
# cuBLAS) or "" (a plain GEMV vs cuBLAS alone)
GPU_CASES = (("qkv", 6144, 4096, "norm"), ("gate_up", 28672, 4096, "norm"),
             ("down", 4096, 14336, "silu_mul"), ("o_proj", 4096, 4096, ""),
             ("down", 4096, 14336, ""))
CPU_CASES = (("tiny", 48, 64, "norm"), ("tiny", 40, 96, "silu_mul"), ("tiny", 40, 96, ""))
# (block_n, block_k, num_warps[, split_k]): the tuner's candidates, each timed in a whole graph here
GPU_CONFIGS = GEMV_TILES
CPU_CONFIGS = ((16, 32, 4),)


def bench_norm_gemv(
    device: torch.device | str,
    cases: tuple[tuple[str, int, int, str], ...] = GPU_CASES,
    configs: tuple[tuple[int, ...], ...] = GPU_CONFIGS,
    num_layers: int = 32,
) -> list[dict[str, Any]]:
    """One row per case: baseline µs per layer, the best fused config's, their ratio."""
    gen = torch.Generator(device=device).manual_seed(0)  # weights made on the device: fast
    rows = [_bench_case(name, n, k, prologue, configs, num_layers, device, gen)
            for name, n, k, prologue in cases]
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # ~9 GB of weights: give them back before the model parts
    return rows


def _bench_case(name: str, n: int, k: int, prologue: str,
                configs: tuple[tuple[int, ...], ...], num_layers: int,
                device: torch.device | str, gen: torch.Generator) -> dict[str, Any]:
    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).bfloat16()

    x, residual = rand(1, 2 * k if prologue == "silu_mul" else k), rand(1, k)
    norm_weight = (1 + rand(k, scale=0.1).float()).bfloat16()
    # Every layer its own weights (a step reads them from memory, not from L2).
    weights = [rand(n, k, scale=k ** -0.5)
               for _ in range(num_layers if torch.device(device).type == "cuda" else 1)]

    def baseline(w: torch.Tensor) -> torch.Tensor:
        if prologue == "norm":
            return F.linear(rms_norm(x, norm_weight, 1e-5, residual)[0], w)
        return F.linear(silu_mul(x) if prologue == "silu_mul" else x, w)

    def fused(w: torch.Tensor, tiles: tuple[int, ...]) -> torch.Tensor:
        if prologue == "silu_mul":
            return silu_mul_gemv(x, w, tiles=tiles)
        norm = prologue == "norm"
        return norm_gemv(x, norm_weight if norm else None, 1e-5, w,
                         residual=residual if norm else None, tiles=tiles)[0]

    expected = baseline(weights[0])
    label = {"norm": "norm+gemv", "silu_mul": "silu_mul+gemv", "": "gemv"}[prologue]
    row: dict[str, Any] = {"case": f"{label} {name} {n}x{k}",
                           "baseline_us": _layers_us(baseline, weights, device)}
    best: tuple[float, tuple[int, ...]] | None = None
    for config in configs:
        if rel_err(fused(weights[0], config), expected) > 2e-2:
            row.setdefault("wrong_configs", []).append(config)
            continue
        us = _layers_us(functools.partial(fused, tiles=config), weights, device)
        if best is None or us < best[0]:
            best = (us, config)
    if best is not None:
        row["fused_us"], row["best_config"] = best
        row["baseline_over_fused"] = row["baseline_us"] / row["fused_us"]
        row["fused_GB_s"] = n * k * 2 / row["fused_us"] / 1e3
    return row


def _layers_us(fn: Callable[[torch.Tensor], Any], weights: list[torch.Tensor],
               device: torch.device | str) -> float:
    """µs per call of `fn` over every layer's weights (one CUDA graph of them on the GPU)."""
    return graph_us_per_call([functools.partial(fn, w) for w in weights], device)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU (the CPU smoke case runs in benchmarks/gpu_check.py --dry-run)")
        return 2
    for row in bench_norm_gemv("cuda"):
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
