"""Counter-based random numbers: a pure function of (seed, index, column).

Seeded sampling must not depend on which other requests share the batch, on the batch order,
on the device, or on how many tokens were drawn before (a request resumed on another worker
continues the same random stream at the next index). A stateful `torch.Generator` gives none
of that. Here each value is a hash of the triple, computed with int64 tensor ops only, so CPU
and CUDA give bit-identical results and any number of rows is drawn in one batched call.

The hash is splitmix64 (Steele, Lea & Flood 2014): a row key is the `index`-th output of the
splitmix64 stream seeded with `seed`, and column `c` is the `c`-th output of the stream seeded
with that key. int64 multiplication wraps like uint64 (two's complement), and the right shifts
are made logical by masking, because torch shifts int64 arithmetically.
"""

from __future__ import annotations

import torch

__all__ = ["to_int64_seed", "uniform"]

_U64 = 1 << 64


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)  # splitmix64's odd increment, 2**64 / phi
_MIX_MUL_1 = _signed(0xBF58476D1CE4E5B9)
_MIX_MUL_2 = _signed(0x94D049BB133111EB)
_NUM_FLOAT_BITS = 23  # 23 random bits + a half step keep every value strictly inside (0, 1)


def to_int64_seed(seed: int) -> int:
    """Map a seed in [0, 2**64) to the int64 with the same 64 bits (what `uniform` takes)."""
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return _signed(seed)


def _xor_shift_right_(x: torch.Tensor, num_bits: int) -> None:
    """x ^= x >>> num_bits, in place. `>>` on int64 copies the sign bit in; masking the top
    `num_bits` bits makes the shift logical."""
    shifted = x >> num_bits
    shifted &= (1 << (64 - num_bits)) - 1
    x ^= shifted


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on a tensor the caller owns: a bijection of 64-bit
    words with full avalanche. In place because the [n, vocab] call is memory-bound."""
    _xor_shift_right_(x, 30)
    x *= _MIX_MUL_1
    _xor_shift_right_(x, 27)
    x *= _MIX_MUL_2
    _xor_shift_right_(x, 31)
    return x


def uniform(seeds: torch.Tensor, indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Uniform floats in the open interval (0, 1), one row per (seed, index) pair.

    seeds: [n] int64 (use `to_int64_seed` for seeds ≥ 2**63); indices: [n] int64, the 0-based
    index of the token being generated. Returns [n, num_cols] float32 on the seeds' device;
    entry [r, c] depends only on (seeds[r], indices[r], c). Exactly, with uint64 wraparound and
    `mix` = splitmix64's finaliser, `G` = 0x9E3779B97F4A7C15:
        key = mix(mix(seed + G) + index * G);  bits = mix(key + (c + 1) * G)
        value = ((int64(bits) >> 41) + 2**22 + 0.5) / 2**23
    i.e. 23 uniform bits on a grid offset by half a step, so neither 0 nor 1 is ever returned.
    """
    if seeds.dtype != torch.int64 or indices.dtype != torch.int64:
        raise TypeError("seeds and indices must be int64 tensors")
    if seeds.shape != indices.shape or seeds.dim() != 1:
        shapes = f"{tuple(seeds.shape)} and {tuple(indices.shape)}"
        raise ValueError(f"seeds and indices must both be [n], got {shapes}")
    if num_cols < 0:
        raise ValueError(f"num_cols must be >= 0, got {num_cols}")
    stream = _mix64_(seeds + _GOLDEN_GAMMA)  # [n]
    row_key = _mix64_(stream + indices * _GOLDEN_GAMMA)  # [n]
    cols = torch.arange(1, num_cols + 1, dtype=torch.int64, device=seeds.device)  # [num_cols]
    bits = _mix64_(row_key[:, None] + cols[None, :] * _GOLDEN_GAMMA)  # [n, num_cols]
    # The arithmetic shift leaves the top 23 bits as a signed value in [-2**22, 2**22).
    top = (bits >> (64 - _NUM_FLOAT_BITS)).to(torch.float32)  # [n, num_cols]
    return (top + (2.0 ** (_NUM_FLOAT_BITS - 1) + 0.5)) * 2.0**-_NUM_FLOAT_BITS
