"""The C int4 / int8 weight-only GEMM kernels against float32 matmuls of the same weights."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tokenfleet.engine.quant.int4_weight_only import Int4WeightOnlyLinear
from tokenfleet.engine.quant.int8_weight_only import Int8WeightOnlyLinear
from tokenfleet.kernels import cpu_qgemm
from tokenfleet.kernels.cpu_qgemm import CpuQGemm

MatMul = Callable[[torch.Tensor], torch.Tensor]
pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the kernels cannot be built")


@pytest.fixture(scope="module")
def kernel(load_bf16_kernel: Callable[..., CpuQGemm]) -> CpuQGemm:
    return load_bf16_kernel(cpu_qgemm.load, "quantized linears stay on torch's kernels")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed)).bfloat16()


class Q4:
    """Random int4 weights (q, d, m) and the float32 matrix they stand for."""

    def __init__(self, n: int, k: int, seed: int):
        g = _gen(seed)
        self.q = torch.randint(0, 16, (n, k), generator=g)
        self.d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
        self.m = (-torch.rand(n, k // 32, generator=g) * 0.15).half()
        groups = self.q.view(n, k // 32, 32).float()
        self.w = (groups * self.d.float()[..., None] + self.m.float()[..., None]).view(n, k)


class Q8:
    def __init__(self, n: int, k: int, seed: int):
        g = _gen(seed)
        self.q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        self.s = torch.rand(n, generator=g) * 0.002 + 1e-4
        self.scales = torch.zeros(-(-n // 48) * 48)
        self.scales[:n] = self.s
        self.w = self.q.float() * self.s[:, None]


def _assert_close_to(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     b: torch.Tensor | None, slack: torch.Tensor) -> None:
    """out is x @ w^T + b rounded to bf16, up to fp32 summation error (`slack` [n] bounds the
    per-term magnitude the kernel sums, e.g. int4's 128 + q)."""
    ref = x.float() @ w.t() + (0 if b is None else b.float())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    summed = x.float().abs().sum(dim=1, keepdim=True) * slack  # [m, n]
    bound = ref.abs() * 2.0**-8 + summed * 2.0**-18 + 1e-6
    err = (out.float() - ref).abs()
    assert bool((err <= bound).all()), (err / bound).max()


def _q4_slack(w: Q4) -> torch.Tensor:
    return (w.w.abs().amax(dim=1) + 128 * w.d.float().amax(dim=1)) * 4


# M across the 4-row tiles' tails, N across the 48-column panels' tails, K across groups
@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (3, 49, 32), (4, 48, 64), (5, 17, 96),
                                   (9, 100, 1536), (33, 1, 32)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_q4_matches_float32_matmul(kernel: CpuQGemm, m: int, n: int, k: int, bias: bool) -> None:
    w, x = Q4(n, k, seed=n + k), _x(m, k, seed=m)
    b = torch.randn(n, generator=_gen(7)).bfloat16() if bias else None
    out = kernel.q4(x, kernel.pack_q4(w.q, w.d, w.m), b, n)
    _assert_close_to(out, x, w.w, b, _q4_slack(w))


@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (3, 49, 2), (4, 48, 6), (9, 100, 1536),
                                   (33, 1, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_q8_matches_float32_matmul(kernel: CpuQGemm, m: int, n: int, k: int, bias: bool) -> None:
    w, x = Q8(n, k, seed=n + k), _x(m, k, seed=m)
    b = torch.randn(n, generator=_gen(7)).bfloat16() if bias else None
    out = kernel.q8(x, kernel.pack_q8(w.q), w.scales, b, n)
    _assert_close_to(out, x, w.w, b, w.w.abs().amax(dim=1))


def _both(kernel: CpuQGemm, n: int, k: int) -> tuple[MatMul, MatMul]:
    """x -> x @ w^T for a random int4 and a random int8 [n, k] weight."""
    w4, w8 = Q4(n, k, seed=1), Q8(n, k, seed=2)
    p4, p8 = kernel.pack_q4(w4.q, w4.d, w4.m), kernel.pack_q8(w8.q)
    return (lambda x: kernel.q4(x, p4, None, n)), (lambda x: kernel.q8(x, p8, w8.scales, None, n))


@pytest.mark.parametrize("threads", [1, 2, 3, 16])  # 16: more threads than panels split rows
def test_threads_change_nothing(kernel: CpuQGemm, threads: int) -> None:
    x = _x(45, 576, seed=3)
    old = torch.get_num_threads()
    try:
        for f in _both(kernel, 576, 576):
            torch.set_num_threads(1)
            want = f(x)
            torch.set_num_threads(threads)
            assert torch.equal(f(x), want)
    finally:
        torch.set_num_threads(old)


def test_a_row_does_not_depend_on_its_batch(kernel: CpuQGemm) -> None:
    """Batch invariance: each output is summed in one order whatever the batch."""
    x = _x(33, 256, seed=4)
    for f in _both(kernel, 300, 256):
        batch = f(x)
        for i in (0, 3, 4, 32):
            assert torch.equal(f(x[i:i + 1])[0], batch[i])
            assert torch.equal(f(x[i:i + 6])[0], batch[i])


def test_strided_and_empty_inputs(kernel: CpuQGemm) -> None:
    big = _x(10, 200, seed=5)
    x = big[:, 8:72]  # row stride 200: read in place
    xt = _x(64, 10, seed=6).t()  # column-major: copied
    for f in _both(kernel, 96, 64):
        assert torch.equal(f(x), f(x.contiguous()))
        assert torch.equal(f(xt), f(xt.contiguous()))
        assert f(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 96)


def test_bad_arguments(kernel: CpuQGemm) -> None:
    w4, w8 = Q4(50, 64, seed=1), Q8(50, 64, seed=2)
    p4, p8 = kernel.pack_q4(w4.q, w4.d, w4.m), kernel.pack_q8(w8.q)
    x = _x(4, 64, seed=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.pack_q4(w4.q[:, :48], w4.d, w4.m)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        kernel.pack_q4(w4.q + 1, w4.d, w4.m)
    with pytest.raises(ValueError, match="d and m"):
        kernel.pack_q4(w4.q, w4.d[:, :1], w4.m)
    with pytest.raises(ValueError, match="int8"):
        kernel.pack_q8(w8.q.float())
    with pytest.raises(ValueError, match="bf16"):
        kernel.q4(x.float(), p4, None, 50)
    with pytest.raises(ValueError, match="does not fit"):
        kernel.q4(_x(4, 32, seed=4), p4, None, 50)
    with pytest.raises(ValueError, match="does not fit"):
        kernel.q4(x, p8.view(torch.uint8), None, 50)
    with pytest.raises(ValueError, match="does not fit"):
        kernel.q8(x, p8, w8.scales, None, 97)
    with pytest.raises(ValueError, match="scales"):
        kernel.q8(x, p8, w8.s, None, 50)  # not padded to whole panels
    with pytest.raises(ValueError, match="bias"):
        kernel.q8(x, p8, w8.scales, torch.zeros(49, dtype=torch.bfloat16), 50)


def test_custom_ops_under_compile(kernel: CpuQGemm) -> None:
    """dynamo keeps the kernels as opaque ops (no graph break, same numbers)."""
    w4, w8 = Q4(20, 64, seed=1), Q8(20, 64, seed=2)
    p4, p8 = kernel.pack_q4(w4.q, w4.d, w4.m), kernel.pack_q8(w8.q)
    b = torch.randn(20, generator=_gen(3)).bfloat16()

    def f(x: torch.Tensor) -> torch.Tensor:
        return (cpu_qgemm.cpu_q4_gemm(kernel, x, p4, b, 20)
                + cpu_qgemm.cpu_q8_gemm(kernel, x, p8, w8.scales, None, 20))

    x = _x(5, 64, seed=4)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_linears_agree_with_torchs_kernels(kernel: CpuQGemm) -> None:
    """The engine's int4 / int8 linears on our kernels and on torch's quantize the same weight
    to the same grid; only the scales' precision differs (fp16/fp32 here, bf16 there)."""
    weight = (torch.randn(208, 576, generator=_gen(5)) * 0.05).bfloat16()  # torch's: N % 16
    bias = torch.randn(208, generator=_gen(6)).bfloat16()
    x = _x(7, 576, seed=7)
    ref = x.float() @ weight.float().t() + bias.float()
    for cls in (Int4WeightOnlyLinear, Int8WeightOnlyLinear):
        ours, theirs = cls(weight, bias, kernel)(x).float(), cls(weight, bias)(x).float()
        assert (ours - theirs).norm() / ref.norm() < 0.01, cls
        # ours is no further from the unquantized product than torch's
        assert (ours - ref).norm() <= (theirs - ref).norm() * 1.02, cls


def test_build_is_cached(tmp_path: Path, kernel: CpuQGemm) -> None:
    first = cpu_qgemm.load(tmp_path)
    assert first is not None
    assert [p.name for p in tmp_path.iterdir()] == [first.library.name]
    assert cpu_qgemm.load(tmp_path) is first
