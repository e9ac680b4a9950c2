"""rotary_store_kv (Triton, one launch) vs its reference and vs rotary + store_kv (two)."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.kv_store import store_kv
from tokenfleet.kernels.reference import rotary_store_kv_ref
from tokenfleet.kernels.rope_cache import build_cos_sin_cache
from tokenfleet.kernels.rotary import rotary
from tokenfleet.kernels.rotary_store_kv import rotary_store_kv
from tokenfleet.kernels.selfcheck import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_TOKENS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 7, 24, 4, 6


def _inputs(num_heads: int, num_kv_heads: int, dtype: torch.dtype, rotary_dim: int,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """q, k, v as column slices of one fused qkv output (token stride > heads * head_dim),
    shuffled cache slots with two -1 (skip) entries, random positions, random caches."""
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * HEAD_DIM
    qkv = torch.randn(NUM_TOKENS, width, generator=gen).to(dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM,
                         num_kv_heads * HEAD_DIM], dim=1)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:NUM_TOKENS]
    slots[[1, 4]] = -1
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    return {
        "q": q.view(NUM_TOKENS, num_heads, HEAD_DIM),
        "k": k.view(NUM_TOKENS, num_kv_heads, HEAD_DIM),
        "v": v.view(NUM_TOKENS, num_kv_heads, HEAD_DIM),
        "positions": torch.randint(0, 64, (NUM_TOKENS,), generator=gen).to(DEVICE),
        "cos_sin_cache": build_cos_sin_cache(rotary_dim, 64, 10000.0, None, device=DEVICE),
        "k_cache": torch.randn(cache_shape, generator=gen).to(dtype=dtype, device=DEVICE),
        "v_cache": torch.randn(cache_shape, generator=gen).to(dtype=dtype, device=DEVICE),
        "slot_mapping": slots.to(DEVICE),
    }


def _cloned(args: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in args.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 16], ids=["full", "partial"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2)], ids=["gqa1", "gqa3", "gqa4"])
def test_matches_reference(dtype: torch.dtype, rotary_dim: int, heads: tuple[int, int]) -> None:
    args = _inputs(*heads, dtype, rotary_dim)
    ref = _cloned(args)
    k_before, caches_before = args["k"].clone(), (args["k_cache"].clone(), args["v_cache"].clone())
    q_ref = rotary_store_kv_ref(**ref)
    rotary_store_kv(**args)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(args["q"], q_ref) < tol
    assert rel_err(args["k_cache"], ref["k_cache"]) < tol
    assert torch.equal(args["v_cache"], ref["v_cache"])  # a copy: exact
    assert torch.equal(args["k"], k_before)  # k itself is not rotated
    # Written where the slots say, nowhere else (two tokens skipped).
    written = args["slot_mapping"][args["slot_mapping"] >= 0]
    changed = (args["k_cache"] != caches_before[0]).flatten(0, 1).any(-1).any(-1)
    assert set(changed.nonzero().flatten().tolist()) == set(written.tolist())
    if rotary_dim < HEAD_DIM:  # the unrotated dims go into the cache unchanged
        flat = args["k_cache"].flatten(0, 1)[written]
        kept = args["slot_mapping"] >= 0
        assert torch.equal(flat[..., rotary_dim:], k_before[kept][..., rotary_dim:])


def test_equals_the_two_kernels_it_replaces() -> None:
    """Same float32 math as rotary then store_kv: bit-identical results in bf16 under the
    interpreter (on a GPU the two compilations may contract multiply-adds differently)."""
    args = _inputs(8, 2, torch.bfloat16, HEAD_DIM, seed=5)
    two = _cloned(args)
    rotary_store_kv(**args)
    rotary(two["q"], two["k"], two["positions"], two["cos_sin_cache"])
    store_kv(two["k"], two["v"], two["k_cache"], two["v_cache"], two["slot_mapping"])
    assert torch.equal(args["v_cache"], two["v_cache"])
    for name in ("q", "k_cache"):
        if DEVICE == "cpu":
            assert torch.equal(args[name], two[name]), name
        else:
            assert rel_err(args[name], two[name]) < 1e-3, name


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"k_cache": "half"}, "must match k_cache"),
        ({"positions": "int32"}, "positions: dtype"),
        ({"slot_mapping": "short"}, "slot_mapping"),
        ({"cos_sin_cache": "odd"}, "rotary_dim"),
    ],
    ids=["cache-dtype", "positions-int32", "slots-length", "odd-rotary-dim"],
)
def test_bad_arguments_are_rejected_before_launch(change: dict[str, str], match: str) -> None:
    args = _inputs(4, 2, torch.float32, HEAD_DIM)
    before = _cloned(args)
    name, how = next(iter(change.items()))
    args[name] = {
        "half": lambda t: t.half(),
        "int32": lambda t: t.int(),
        "short": lambda t: t[:-1],
        "odd": lambda t: t[:, :-1],
    }[how](args[name])
    with pytest.raises(KernelArgumentError, match=match):
        rotary_store_kv(**args)
    assert torch.equal(args["q"], before["q"])  # nothing ran
    assert torch.equal(args["v_cache"], before["v_cache"])
