"""Launchers reject malformed arguments with KernelArgumentError (a ValueError), pre-launch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.kv_store import store_kv
from tokenfleet.kernels.paged_attention import paged_attention
from tokenfleet.kernels.paged_batch import PagedBatch, make_paged_batch
from tokenfleet.kernels.rms_norm import rms_norm
from tokenfleet.kernels.rope_cache import build_cos_sin_cache
from tokenfleet.kernels.rotary import rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def b() -> PagedBatch:
    return make_paged_batch(context_lens=(3, 0), query_lens=(1, 5), num_heads=4, num_kv_heads=2,
                            head_dim=8, block_size=4, dtype=torch.float32, device=DEVICE)


def _attention_args(b: PagedBatch, **changes: Any) -> dict[str, Any]:
    args = {"q": b.q, "k_cache": b.k_cache, "v_cache": b.v_cache, "block_tables": b.block_tables,
            "query_start_loc": b.query_start_loc, "seq_lens": b.seq_lens, "scale": 0.3}
    return {**args, **changes}


ATTENTION_CASES: dict[str, tuple[Callable[[PagedBatch], dict[str, Any]], str]] = {
    "q 2-D": (lambda b: {"q": b.q[0]}, "q: expected 3 dims"),
    "q int": (lambda b: {"q": b.q.long()}, "q: dtype"),
    "cache dtype": (lambda b: {"k_cache": b.k_cache.half()}, "k_cache: dtype"),
    "head_dim": (lambda b: {"q": b.q[..., :4]}, "k_cache: dim 3"),
    "v shape": (lambda b: {"v_cache": b.v_cache[:-1]}, "v_cache"),
    "gqa": (lambda b: {"q": b.q[:, :3]}, "multiple of num_kv_heads"),
    "tables int64": (lambda b: {"block_tables": b.block_tables.long()}, "block_tables: dtype"),
    "qsl length": (lambda b: {"query_start_loc": b.query_start_loc[:-1]}, "query_start_loc"),
    "seq_lens length": (lambda b: {"seq_lens": b.seq_lens[:1]}, "seq_lens"),
    "strided head_dim": (lambda b: {"q": b.q.transpose(1, 2).contiguous().transpose(1, 2)},
                         "contiguous"),
    "scale": (lambda b: {"scale": 0.0}, "scale"),
    "window": (lambda b: {"sliding_window": 0}, "sliding_window"),
    "not a tensor": (lambda b: {"seq_lens": [4, 5]}, "expected a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_paged_attention_rejects(b: PagedBatch, case: str) -> None:
    change, message = ATTENTION_CASES[case]
    with pytest.raises(KernelArgumentError, match=message):
        paged_attention(**_attention_args(b, **change(b)))


def test_paged_attention_rejects_bad_tiles_and_splits(b: PagedBatch) -> None:
    with pytest.raises(KernelArgumentError, match="block_n"):
        paged_attention(**_attention_args(b), block_n=12)
    with pytest.raises(KernelArgumentError, match="num_kv_splits"):
        paged_attention(**_attention_args(b), num_kv_splits=0)
    with pytest.raises(KernelArgumentError, match="out"):
        paged_attention(**_attention_args(b), out=b.q[:, :2])


def test_cpu_tensors_without_interpreter_are_rejected(
    b: PagedBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU tensors are only accepted by the interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelArgumentError, match="TRITON_INTERPRET"):
        paged_attention(**_attention_args(b))


def test_store_kv_rejects(b: PagedBatch) -> None:
    with pytest.raises(KernelArgumentError, match="slot_mapping: dtype"):
        store_kv(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping.int())
    with pytest.raises(KernelArgumentError, match="slot_mapping: dim 0"):
        store_kv(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping[:-1])
    with pytest.raises(KernelArgumentError, match="k: dtype"):
        store_kv(b.k.half(), b.v.half(), b.k_cache, b.v_cache, b.slot_mapping)
    with pytest.raises(KernelArgumentError, match="k: dim 1"):
        store_kv(b.q, b.q, b.k_cache, b.v_cache, b.slot_mapping)


def test_rms_norm_rejects() -> None:
    x = torch.randn(3, 8, device=DEVICE)
    weight = torch.ones(8, device=DEVICE)
    with pytest.raises(KernelArgumentError, match="weight: dim 0"):
        rms_norm(x, weight[:7], 1e-5)
    with pytest.raises(KernelArgumentError, match="residual"):
        rms_norm(x, weight, 1e-5, residual=x.half())
    with pytest.raises(KernelArgumentError, match="eps"):
        rms_norm(x, weight, 0.0)


def test_rotary_rejects(b: PagedBatch) -> None:
    cache = build_cos_sin_cache(8, 16, 10000.0, device=DEVICE)
    with pytest.raises(KernelArgumentError, match="positions: dtype"):
        rotary(b.q, b.k, b.positions.int(), cache)
    with pytest.raises(KernelArgumentError, match="cos_sin_cache: dtype"):
        rotary(b.q, b.k, b.positions, cache.double())
    with pytest.raises(KernelArgumentError, match="rotary_dim"):
        rotary(b.q, b.k, b.positions, build_cos_sin_cache(16, 16, 10000.0, device=DEVICE))


def test_errors_are_value_errors() -> None:
    assert issubclass(KernelArgumentError, ValueError)
