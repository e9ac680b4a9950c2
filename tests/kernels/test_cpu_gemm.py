"""The C bf16 GEMM kernel (CPU linears) against torch's float32 matmul."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenfleet.kernels import cpu_gemm
from tokenfleet.kernels.cpu_gemm import CpuGemm

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the kernel cannot be built")


@pytest.fixture(scope="module")
def kernel(load_bf16_kernel: Callable[..., CpuGemm]) -> CpuGemm:
    return load_bf16_kernel(cpu_gemm.load, "linears stay on oneDNN")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16()


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _assert_rounded_from(out: torch.Tensor, ref: torch.Tensor) -> None:
    """out is ref rounded to bf16, up to fp32 summation order: within one bf16 step."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    step = ref.abs() * 2.0**-7 + 1e-4
    assert bool(((out.float() - ref).abs() <= step).all()), (out.float() - ref).abs().max()


# M across the 8-row tiles' tails, N across the 48-column panels' tails, K down to one pair
@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (7, 49, 64), (8, 48, 2), (9, 17, 6),
                                   (33, 100, 1536), (70, 576, 128), (3, 1, 4)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_float32_matmul(kernel: CpuGemm, m: int, n: int, k: int, bias: bool) -> None:
    x, w = _randn(m, k, seed=m), _randn(n, k, seed=n + k)
    b = _randn(n, seed=7) * 4 if bias else None
    out = kernel(x, kernel.pack(w), b, n)
    _assert_rounded_from(out, _reference(x, w, b))


@pytest.mark.parametrize("threads", [1, 2, 3, 16])  # 16: more threads than panels split rows
def test_threads_change_nothing(kernel: CpuGemm, threads: int) -> None:
    x, w = _randn(45, 576, seed=1), _randn(576, 576, seed=2)
    packed = kernel.pack(w)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = kernel(x, packed, None, 576)
        torch.set_num_threads(threads)
        got = kernel(x, packed, None, 576)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, want)
    _assert_rounded_from(got, _reference(x, w, None))


def test_a_row_does_not_depend_on_its_batch(kernel: CpuGemm) -> None:
    """Each output is summed in the same order whatever the batch: a sequence's logits are the
    same alone or among 32 others (batch invariance; oneDNN picks kernels by M)."""
    x, w = _randn(33, 256, seed=3), _randn(300, 256, seed=4)
    packed = kernel.pack(w)
    batch = kernel(x, packed, None, 300)
    for i in (0, 7, 8, 32):
        assert torch.equal(kernel(x[i:i + 1], packed, None, 300)[0], batch[i])
        assert torch.equal(kernel(x[i:i + 9], packed, None, 300)[0], batch[i])


def test_strided_inputs(kernel: CpuGemm) -> None:
    big = _randn(10, 200, seed=5)
    x = big[:, 8:72]  # row stride 200, unit column stride: read in place
    xt = _randn(64, 10, seed=6).t()  # column-major: copied
    w = _randn(96, 200, seed=8)[:, :64]  # a strided weight packs the same as its copy
    packed = kernel.pack(w)
    assert torch.equal(packed, kernel.pack(w.contiguous()))
    _assert_rounded_from(kernel(x, packed, None, 96), _reference(x, w, None))
    _assert_rounded_from(kernel(xt, packed, None, 96), _reference(xt, w, None))


def test_empty_batch(kernel: CpuGemm) -> None:
    out = kernel(torch.empty(0, 64, dtype=torch.bfloat16), kernel.pack(_randn(5, 64, seed=1)),
                 None, 5)
    assert out.shape == (0, 5)


def test_bad_arguments(kernel: CpuGemm) -> None:
    w = _randn(50, 64, seed=1)
    packed = kernel.pack(w)
    x = _randn(4, 64, seed=2)
    with pytest.raises(ValueError, match="even K"):
        kernel.pack(_randn(8, 63, seed=3))
    with pytest.raises(ValueError, match="bf16"):
        kernel.pack(w.float())
    with pytest.raises(ValueError, match="bf16"):
        kernel(x.float(), packed, None, 50)
    with pytest.raises(ValueError, match="does not fit"):
        kernel(_randn(4, 62, seed=4), packed, None, 50)
    with pytest.raises(ValueError, match="does not fit"):
        kernel(x, packed, None, 97)  # 97 outputs need three panels
    with pytest.raises(ValueError, match="bias"):
        kernel(x, packed, _randn(49, seed=5), 50)
    with pytest.raises(ValueError, match="2-D"):
        kernel(x[None], packed, None, 50)


def test_custom_op_under_compile(kernel: CpuGemm) -> None:
    """dynamo keeps the kernel as an opaque op (no graph break, same numbers)."""
    x, w, b = _randn(5, 64, seed=1), _randn(20, 64, seed=2), _randn(20, seed=3)
    packed = kernel.pack(w)

    def f(x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.cpu_gemm(kernel, x, packed, b, 20) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


def test_build_is_cached(tmp_path: Path, kernel: CpuGemm) -> None:
    first = cpu_gemm.load(tmp_path)
    assert first is not None
    assert [p.name for p in tmp_path.iterdir()] == [first.library.name]
    assert cpu_gemm.load(tmp_path) is first
