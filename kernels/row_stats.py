"""Each row's argmax and logsumexp in one pass over the logits (the sampler's two reductions).

torch computes them as ~6 kernels (a float32 copy of the logits, argmax, then max, subtract,
exp, sum, log for logsumexp), each reading or writing a [rows, vocab] float32 tensor: on an
H100 at 128 rows x 128,256 that was ~0.3 ms of an 8.3 ms decode step (torch profiler,
benchmarks/RESULTS.md). Here every row is cut into fixed chunks; one program per (row, chunk)
reads the chunk once in its own dtype (bf16 is widened exactly) and keeps a running max, the
first index of it, and the sum of exponentials rescaled to that max (online softmax); a
second small kernel merges a row's chunks. A row's result depends only on that row (the
chunking follows the vocabulary size alone), so it is the same alone or in any batch.
Semantics: `reference.row_stats_ref` (ties: the first maximal index, as torch.argmax; a row
holding NaN gives the first NaN's index and a NaN logsumexp, as torch does, so a model's
numerics bug shows instead of being sampled around).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfleet.kernels.launch_checks import FLOAT_DTYPES, check_device, check_tensor

__all__ = ["row_stats"]

_CHUNK = 4096  # vocabulary entries per program: 32 chunks a row for Llama 3's 128,256
_BLOCK = 1024  # entries per loop iteration
_NO_NAN: tl.constexpr = tl.constexpr(2**31 - 1)  # "no NaN in this chunk" (and the max int32)


@triton.jit
def _row_chunk_kernel(scores_ptr, part_max_ptr, part_sum_ptr, part_arg_ptr, part_nan_ptr,
                      vocab_size, stride_row, NUM_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    run_max = tl.full([], float("-inf"), tl.float32)
    run_sum = tl.zeros([], tl.float32)
    run_arg = tl.zeros([], tl.int32)
    first_nan = tl.full([], _NO_NAN, tl.int32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(scores_ptr + row * stride_row + offs, mask=offs < vocab_size,
                    other=float("-inf")).to(tl.float32)  # [BLOCK]
        # NaN is tracked apart (torch's argmax picks the first NaN and logsumexp is NaN);
        # the reductions below see -inf in its place.
        is_nan = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, offs, _NO_NAN), axis=0))
        x = tl.where(is_nan, float("-inf"), x)
        block_max = tl.max(x, axis=0)
        block_arg = tl.argmax(x, axis=0, tie_break_left=True)
        new_max = tl.maximum(run_max, block_max)
        # Rescale to the new max; an all -inf prefix keeps a zero sum (no -inf - -inf = nan).
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - base) + tl.sum(tl.exp(x - base), axis=0)
        run_arg = tl.where(block_max > run_max, start + block_arg, run_arg)  # ties: earlier
        run_max = new_max
    out = row * NUM_CHUNKS + chunk
    tl.store(part_max_ptr + out, run_max)
    tl.store(part_sum_ptr + out, run_sum)
    tl.store(part_arg_ptr + out, run_arg)
    tl.store(part_nan_ptr + out, first_nan)


@triton.jit
def _row_merge_kernel(argmax_ptr, lse_ptr, part_max_ptr, part_sum_ptr, part_arg_ptr,
                      part_nan_ptr, NUM_CHUNKS: tl.constexpr, CHUNKS_PADDED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_PADDED)
    ok = offs < NUM_CHUNKS
    maxes = tl.load(part_max_ptr + row * NUM_CHUNKS + offs, mask=ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row * NUM_CHUNKS + offs, mask=ok, other=0.0)
    args = tl.load(part_arg_ptr + row * NUM_CHUNKS + offs, mask=ok, other=0)
    nans = tl.load(part_nan_ptr + row * NUM_CHUNKS + offs, mask=ok, other=_NO_NAN)
    row_max = tl.max(maxes, axis=0)
    base = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(sums * tl.exp(maxes - base), axis=0)
    # The first index holding the row's max: chunks are in order, each holds its first.
    first = tl.min(tl.where(ok & (maxes == row_max), args, _NO_NAN), axis=0)
    lse = tl.where(row_max == float("-inf"), float("-inf"),
                   tl.log(tl.where(total > 0, total, 1.0)) + base)
    first_nan = tl.min(nans, axis=0)
    has_nan = first_nan < _NO_NAN
    tl.store(argmax_ptr + row, tl.where(has_nan, first_nan, first).to(tl.int64))
    tl.store(lse_ptr + row, tl.where(has_nan, float("nan"), lse))


def row_stats(scores: torch.Tensor  # [num_rows, vocab] float32 / bf16 / fp16
              ) -> tuple[torch.Tensor, torch.Tensor]:  # argmax [num_rows] int64, lse float32
    """(scores.argmax(-1), scores.float().logsumexp(-1)) in one read of `scores`."""
    check_tensor("scores", scores, ndim=2, dtypes=FLOAT_DTYPES)
    check_device([("scores", scores)])
    num_rows, vocab_size = scores.shape
    argmax = torch.zeros(num_rows, dtype=torch.int64, device=scores.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=scores.device)
    if num_rows == 0:
        return argmax, lse
    if vocab_size == 0:
        return argmax, lse.fill_(float("-inf"))
    num_chunks = triton.cdiv(vocab_size, _CHUNK)
    part_max = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=scores.device)
    part_sum = torch.empty_like(part_max)
    part_arg = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=scores.device)
    part_nan = torch.empty_like(part_arg)
    _row_chunk_kernel[(num_rows, num_chunks)](
        scores, part_max, part_sum, part_arg, part_nan, vocab_size, scores.stride(0),
        NUM_CHUNKS=num_chunks, CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=4)
    _row_merge_kernel[(num_rows,)](
        argmax, lse, part_max, part_sum, part_arg, part_nan, NUM_CHUNKS=num_chunks,
        CHUNKS_PADDED=triton.next_power_of_2(num_chunks), num_warps=1)
    return argmax, lse
