"""RMSNorm (+ residual add) fused into the matrix-vector product that follows it (decode rows).

At batch 1 a decode step of an 8B model is ~95 % weight reads in GEMVs; what is left is ~380
small kernels, and each boundary between two of them costs the GPU a few microseconds. The
norm before the QKV and gate-up projections is one of them: this kernel computes it in the
GEMV's prologue instead. Each program recomputes the row's root mean square (the row is a few
KB, read from L2) and then streams its BLOCK_N rows of the weight, so the norm costs no launch
and no round trip of the normalised row through memory. Without a norm weight it is a plain
GEMV: the candidate for the o_proj and down projections, where cuBLAS picks split-K at one row
and adds a reduce kernel after each (64 a step). `silu_mul_gemv` puts the MLP's SiLU·mul in
the down projection's prologue the same way. Semantics: `reference.norm_gemv_ref`, and
`silu_mul_ref` then a linear layer.

Tiles (rows of W per program, K per iteration, warps) are picked per shape by timing the
candidates on the device (`TileTuner`): o_proj's 4,096 rows want small row blocks to keep
enough loads in flight, gate-up's 28,672 do not. Explicit tiles skip the tuner (tests).

The engine uses it only with `fused_decode_gemv` (off). On an H100 a one-row Triton GEMV here
reached 1.7-2.8 TB/s, against cuBLAS's 2.0-2.9 TB/s. Per layer against RMSNorm + cuBLAS it was
1.01x on gate-up, 0.98x on qkv, 0.87x on o_proj and 0.78x on down. Hence the UNFUSED
candidate. The split-K candidates came after that run and have not met a GPU yet: compiled
for sm_90, the one-pass down GEMV (32x512) holds 204 registers a thread, so about two
programs fit an SM; an 8x512 split-K program holds 56, so several times more loads can be in
flight, which is what a 4,096-row GEMV lacks. `kernels/norm_gemv_bench.py` times it on the
GPU check, and `benchmarks/gpu_bench.py` runs batch-1 decode with and without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.launch_checks import FLOAT_DTYPES, check_device, check_tensor
from tokenfleet.kernels.rms_norm import check_rms_norm_args, rms_norm
from tokenfleet.kernels.silu_mul import silu_mul
from tokenfleet.kernels.tile_tuner import TileTuner

__all__ = ["GEMV_TILES", "GEMV_TUNER", "UNFUSED", "GemvTiles", "norm_gemv", "silu_mul_gemv"]

# (block_n, block_k, num_warps[, split_k]) candidates: from 1,024 programs of 4 rows (the
# 4,096-row projections) to 64-row blocks, and K loads of 8 to 64 KB an iteration. split_k
# cuts K into parts summed by a second kernel in a fixed order (deterministic, as cuBLAS's
# split-K reduce is): o_proj and down have too few rows to keep 132 SMs' loads in flight
# (cuBLAS picks split-K there too). UNFUSED is the two-kernel path (our RMSNorm or SiLU·mul,
# then cuBLAS): a shape where cuBLAS is faster keeps it, so the fused path is never slower
# than the plain one per shape.
GemvTiles = tuple[int, ...]
UNFUSED: GemvTiles = (0, 0, 0)
GEMV_TILES: tuple[GemvTiles, ...] = (
    (4, 1024, 4), (4, 2048, 4), (8, 512, 4), (8, 1024, 4), (8, 2048, 8), (16, 256, 4),
    (16, 512, 4), (16, 1024, 8), (16, 2048, 8), (32, 256, 4), (32, 512, 4), (64, 256, 8),
    (64, 512, 8), (8, 512, 4, 2), (8, 512, 4, 4), (16, 512, 4, 4), (16, 1024, 8, 2),
    (8, 1024, 4, 4), (32, 512, 4, 4), (32, 512, 4, 8), UNFUSED)
GEMV_TUNER: TileTuner[GemvTiles] = TileTuner(GEMV_TILES, default=(32, 256, 4))
_SUM_BLOCK = 1024  # outputs per program of the split-K sum


@triton.jit
def _load_h(x_ptr, res_ptr, offs_k, k_ok, HAS_RESIDUAL: tl.constexpr):
    # The norm's input: x (+ residual, added and rounded in the model dtype as HF does).
    h = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(res_ptr + offs_k, mask=k_ok, other=0.0)
             .to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def _norm_gemv_kernel(
    out_ptr, new_residual_ptr, x_ptr, residual_ptr, norm_weight_ptr, weight_ptr, bias_ptr,
    eps, N,
    stride_out, stride_new_res, stride_x, stride_res, stride_w,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    APPLY_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    x_row = x_ptr + row * stride_x
    res_row = residual_ptr + row * stride_res
    # Pass 1: the row's inverse RMS (float32), over all of K whatever this program's part.
    inv_rms = 1.0
    if APPLY_NORM:
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            hf = _load_h(x_row, res_row, offs_k, offs_k < K, HAS_RESIDUAL).to(tl.float32)
            squares += hf * hf
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    # Pass 2: out[n] = sum_k W[n, k] * normed[k] over this program's BLOCK_N rows of W and
    # its part of K (parts of whole BLOCK_K tiles).
    if SPLIT_K == 1:  # bounds known at compile time, as before split-K existed
        k_lo = 0
        k_hi = K
    else:
        K_PART: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
        k_lo = split * K_PART
        k_hi = tl.minimum(k_lo + K_PART, K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    res_end = tl.where(pid_n == 0, k_hi, 0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = offs_k < k_hi
        h = _load_h(x_row, res_row, offs_k, k_ok, HAS_RESIDUAL)  # (the gate, with SILU_MUL)
        if HAS_RESIDUAL:  # programs pid_n 0 write the new residual stream (others: no mask)
            tl.store(new_residual_ptr + row * stride_new_res + offs_k, h,
                     mask=offs_k < res_end)
        xn = h.to(tl.float32)  # [BLOCK_K]
        if SILU_MUL:  # x is gate | up [2K]: the input is SiLU(gate) * up, as silu_mul makes it
            up = tl.load(x_row + K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            xn = (xn / (1.0 + tl.exp(-xn)) * up).to(h.dtype).to(tl.float32)
        if APPLY_NORM:
            # HF rounds the normalised row to the model dtype before the weight multiply, and
            # the product again (the linear's input).
            normed = (xn * inv_rms).to(h.dtype).to(tl.float32)
            g = tl.load(norm_weight_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            xn = (g * normed).to(h.dtype).to(tl.float32)
        # Each weight is read once: first out of the cache (the row x stays in it).
        w = tl.load(weight_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
        acc += tl.sum(w.to(tl.float32) * xn[None, :], axis=1)
    if SPLIT_K > 1:  # a float32 partial [SPLIT_K, rows, N]; _sum_parts_kernel adds them up
        part = (split * tl.num_programs(1) + row) * N + offs_n
        tl.store(out_ptr + part, acc, mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty),
                 mask=n_ok)


@triton.jit
def _sum_parts_kernel(out_ptr, parts_ptr, bias_ptr, N, stride_out,
                      SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    # out[row, n] = sum of the SPLIT_K partials, in split order (the same sum every run).
    row = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(parts_ptr + (split * tl.num_programs(1) + row) * N + offs_n, mask=n_ok)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def norm_gemv(
    x: torch.Tensor,  # [num_rows, K]
    norm_weight: torch.Tensor | None,  # [K]; None: no norm (a plain GEMV)
    eps: float,
    weight: torch.Tensor,  # [N, K] (nn.Linear layout)
    bias: torch.Tensor | None = None,  # [N]
    residual: torch.Tensor | None = None,  # [num_rows, K]
    *,
    tiles: GemvTiles | None = None,  # (block_n, block_k, num_warps[, split_k]), UNFUSED
) -> tuple[torch.Tensor, torch.Tensor]:  # (out [num_rows, N], new_residual [num_rows, K])
    """linear(rms_norm(x (+ residual))): the RMSNorm of `rms_norm` in the GEMV's prologue.

    For decode-sized row counts (each program reads its weight rows once per input row).
    new_residual is `x` itself without `residual`, else a new tensor x + residual. Without
    `norm_weight` it is a plain GEMV, linear(x) (no residual then), the candidate for the
    projections that follow no norm. `tiles` (powers of two, or UNFUSED: our RMSNorm then
    cuBLAS) overrides the tuned choice. Raises KernelArgumentError on bad arguments.
    """
    if norm_weight is not None:
        check_rms_norm_args(x, norm_weight, eps, residual, weight_name="norm_weight")
    elif residual is not None:
        raise KernelArgumentError("a residual needs the norm (norm_weight) it feeds")
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    _check_linear("x", x, x.shape[1], weight, bias, tiles)
    return _launch(x, weight, bias, tiles, norm_weight=norm_weight, eps=eps, residual=residual)


def silu_mul_gemv(
    gate_up: torch.Tensor,  # [num_rows, 2 * K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    *,
    tiles: GemvTiles | None = None,  # (block_n, block_k, num_warps[, split_k]), UNFUSED
) -> torch.Tensor:  # [num_rows, N]
    """linear(silu_mul(gate_up)): the MLP's activation in the down projection's prologue."""
    check_tensor("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES)
    if gate_up.shape[1] % 2:
        raise KernelArgumentError(f"gate_up: last dimension must be even, got {gate_up.shape[1]}")
    _check_linear("gate_up", gate_up, gate_up.shape[1] // 2, weight, bias, tiles)
    return _launch(gate_up, weight, bias, tiles, silu_mul=True)[0]


def _check_linear(x_name: str, x: torch.Tensor, k: int, weight: torch.Tensor,
                  bias: torch.Tensor | None, tiles: GemvTiles | None) -> None:
    """The product's own arguments: weight [N, k] in x's dtype, bias [N], one device, tiles."""
    check_tensor("weight", weight, ndim=2, dtypes=[x.dtype], shape=(None, k))
    tensors = [(x_name, x), ("weight", weight)]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(weight.shape[0],))
        tensors.append(("bias", bias))
    check_device(tensors)
    if tiles is None or tiles == UNFUSED:
        return
    if len(tiles) not in (3, 4):
        raise KernelArgumentError(f"tiles must be (block_n, block_k, num_warps[, split_k]), "
                                  f"got {tiles}")
    for name, size in zip(("block_n", "block_k", "num_warps", "split_k"), tiles, strict=False):
        if size < 1 or size & (size - 1):
            raise KernelArgumentError(f"{name} must be a power of two, got {size}")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            tiles: GemvTiles | None, *, norm_weight: torch.Tensor | None = None,
            eps: float = 1.0, residual: torch.Tensor | None = None,
            silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # out, new residual
    num_rows, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    if num_rows == 0 or n == 0:
        new_residual = x if residual is None else x + residual
        return torch.empty((num_rows, n), dtype=x.dtype, device=x.device), new_residual

    def run(config: GemvTiles) -> tuple[torch.Tensor, torch.Tensor]:
        if config == UNFUSED:
            return _two_kernels(x, weight, bias, norm_weight, eps, residual, silu_mul)
        block_n, block_k, num_warps = config[:3]
        split_k = config[3] if len(config) > 3 else 1
        out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
        # Split-K: the float32 parts first ([split_k, rows, N]), then their sum into out.
        parts = out if split_k == 1 else torch.empty((split_k, num_rows, n),
                                                     dtype=torch.float32, device=x.device)
        new_res = x if residual is None else torch.empty_like(x)
        res = x if residual is None else residual  # absent tensors: x, never read
        b = weight if bias is None else bias
        _norm_gemv_kernel[(triton.cdiv(n, block_n), num_rows, split_k)](
            parts, new_res, x, res, x if norm_weight is None else norm_weight, weight, b, eps,
            n, out.stride(0), new_res.stride(0), x.stride(0), res.stride(0), weight.stride(0),
            K=k, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
            APPLY_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
            num_warps=num_warps,
        )
        if split_k > 1:
            _sum_parts_kernel[(triton.cdiv(n, _SUM_BLOCK), num_rows)](
                out, parts, b, n, out.stride(0), SPLIT_K=split_k, BLOCK=_SUM_BLOCK,
                HAS_BIAS=bias is not None, num_warps=4)
        return out, new_res

    if tiles is None:  # every run of this shape computes the same outputs: safe to repeat
        key = (x.device, x.dtype, num_rows, n, k, norm_weight is not None,
               residual is not None, bias is not None, silu_mul)
        tiles = GEMV_TUNER.choose(key, x.device, run)
    return run(tiles)


def _two_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 norm_weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None,
                 silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused path: our RMSNorm (+ residual) or SiLU·mul kernel, then cuBLAS."""
    new_residual = x
    if norm_weight is not None:
        x, new_residual = rms_norm(x, norm_weight, eps, residual)
    elif silu:
        x = silu_mul(x)
    # The fused kernel accepts a bias of another float dtype; F.linear wants x's.
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype)), new_residual
