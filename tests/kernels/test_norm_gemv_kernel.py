"""norm_gemv (RMSNorm fused into the GEMV after it) vs its reference and vs the two kernels."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.norm_gemv import UNFUSED, norm_gemv, silu_mul_gemv
from tokenfleet.kernels.reference import norm_gemv_ref, silu_mul_ref
from tokenfleet.kernels.rms_norm import rms_norm
from tokenfleet.kernels.selfcheck import rel_err
from tokenfleet.kernels.silu_mul import silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _args(num_rows: int, k: int, n: int, dtype: torch.dtype, seed: int = 0,
          residual: bool = True, bias: bool = False) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)

    return {
        "x": rand(num_rows, k),
        "norm_weight": (1 + rand(k, scale=0.1).float()).to(dtype),
        "weight": rand(n, k, scale=k ** -0.5),
        "bias": rand(n) if bias else None,
        "residual": rand(num_rows, k) if residual else None,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("num_rows", "k", "n", "residual", "bias"),
    [(1, 96, 40, True, False),  # K and N not multiples of the tiles
     (3, 64, 16, False, True),  # several rows, no residual, a bias (Qwen2's qkv)
     (2, 200, 70, True, True)],
    ids=["one-row", "three-rows-bias", "residual-and-bias"],
)
@pytest.mark.parametrize("tiles", [(16, 32, 4), (16, 32, 4, 2), (8, 32, 4, 4), UNFUSED],
                         ids=["fused", "split-k-2", "split-k-4", "unfused"])
def test_matches_reference(dtype: torch.dtype, num_rows: int, k: int, n: int, residual: bool,
                           bias: bool, tiles: tuple[int, ...]) -> None:
    """Fused, and the tuner's other candidate: our RMSNorm kernel, then a linear layer."""
    args = _args(num_rows, k, n, dtype, residual=residual, bias=bias)
    x_before = args["x"].clone()  # type: ignore[union-attr]
    out, new_res = norm_gemv(**args, eps=1e-5, tiles=tiles)  # type: ignore[arg-type]
    out_ref, res_ref = norm_gemv_ref(**args, eps=1e-5)  # type: ignore[arg-type]
    tol = 1e-5 if dtype == torch.float32 else 1.2e-2
    assert rel_err(out, out_ref) < tol
    # The same rounded sum (in bf16 the interpreter rounds by truncation: an ulp apart).
    assert rel_err(new_res, res_ref) <= (0.0 if dtype == torch.float32 else 1e-2)
    assert torch.equal(args["x"], x_before)
    if not residual:
        assert new_res is args["x"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tiles", [(16, 64, 4), (16, 32, 4, 4), UNFUSED],
                         ids=["fused", "split-k", "unfused"])
def test_without_a_norm_it_is_a_plain_gemv(dtype: torch.dtype,
                                           tiles: tuple[int, ...]) -> None:
    args = _args(2, 160, 72, dtype, seed=7, residual=False, bias=True)
    args["norm_weight"] = None
    out, new_res = norm_gemv(**args, eps=1e-5, tiles=tiles)  # type: ignore[arg-type]
    expected = (args["x"].float() @ args["weight"].float().T  # type: ignore[union-attr]
                + args["bias"].float()).to(dtype)  # type: ignore[union-attr]
    assert rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert new_res is args["x"]
    with pytest.raises(KernelArgumentError, match="residual needs the norm"):
        norm_gemv(**{**args, "residual": args["x"]}, eps=1e-5)  # type: ignore[arg-type]


def test_equals_rms_norm_then_linear() -> None:
    """The same as the two kernels it replaces (our RMSNorm, then a float32 product)."""
    args = _args(2, 128, 48, torch.bfloat16, seed=3)
    normed, new_res = rms_norm(args["x"], args["norm_weight"], 1e-5,  # type: ignore[arg-type]
                               args["residual"])
    two = (normed.float() @ args["weight"].float().T).bfloat16()  # type: ignore[union-attr]
    out, fused_res = norm_gemv(**args, eps=1e-5, tiles=(32, 64, 4))  # type: ignore[arg-type]
    assert torch.equal(fused_res, new_res)
    # The norm's sum of squares adds in another order: at most a bf16 ulp on a few inputs.
    assert rel_err(out, two) < 1e-2


@pytest.mark.parametrize(
    ("change", "match"),
    [({"weight": "transposed"}, "weight"), ({"norm_weight": "short"}, "norm_weight"),
     ({"tiles": (24, 32, 4)}, "block_n"), ({"tiles": (16, 32, 4, 3)}, "split_k"),
     ({"tiles": (16, 32)}, "tiles must be"), ({"eps": 0.0}, "eps")],
    ids=["weight-shape", "norm-weight-shape", "block-not-power-of-two", "split-k-3",
         "short-tiles", "eps"],
)
def test_bad_arguments_are_rejected(change: dict[str, object], match: str) -> None:
    args: dict[str, object] = {**_args(1, 64, 32, torch.float32), "eps": 1e-5}
    name, how = next(iter(change.items()))
    if how == "transposed":
        args[name] = args[name].T.contiguous()  # type: ignore[attr-defined]
    elif how == "short":
        args[name] = args[name][:-1]  # type: ignore[index]
    else:
        args[name] = how
    with pytest.raises(KernelArgumentError, match=match):
        norm_gemv(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("tiles", [(16, 32, 4), (8, 32, 4, 2), UNFUSED],
                         ids=["fused", "split-k", "unfused"])
def test_silu_mul_in_the_down_gemv(dtype: torch.dtype, bias: bool,
                                   tiles: tuple[int, ...]) -> None:
    """silu_mul_gemv = linear(silu_mul(gate_up)): against the reference, and against our
    silu_mul kernel followed by a float32 product (the same rounded activations)."""
    gen = torch.Generator().manual_seed(11)
    num_rows, k, n = 2, 120, 56  # K and N not multiples of the tiles
    gate_up = (torch.randn(num_rows, 2 * k, generator=gen) * 2).to(dtype=dtype, device=DEVICE)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype=dtype, device=DEVICE)
    b = torch.randn(n, generator=gen).to(dtype=dtype, device=DEVICE) if bias else None
    out = silu_mul_gemv(gate_up, weight, b, tiles=tiles)
    expected = silu_mul_ref(gate_up).float() @ weight.float().T
    if b is not None:
        expected = expected + b.float()
    assert rel_err(out, expected.to(dtype)) < (1e-5 if dtype == torch.float32 else 1.2e-2)
    two = silu_mul(gate_up).float() @ weight.float().T + (b.float() if b is not None else 0)
    assert rel_err(out, two.to(dtype)) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(KernelArgumentError, match="even"):
        silu_mul_gemv(gate_up[:, 1:], weight)


def test_split_k_equals_one_pass_over_k() -> None:
    """Split-K sums the same float32 products in parts, in split order: within rounding of
    the one-pass kernel, and the same bits on every run (no atomics)."""
    args = _args(2, 256, 40, torch.float32, seed=5, bias=True)
    one, one_res = norm_gemv(**args, eps=1e-5, tiles=(8, 32, 4))  # type: ignore[arg-type]
    split, split_res = norm_gemv(**args, eps=1e-5, tiles=(8, 32, 4, 4))  # type: ignore[arg-type]
    again, _ = norm_gemv(**args, eps=1e-5, tiles=(8, 32, 4, 4))  # type: ignore[arg-type]
    assert torch.equal(split_res, one_res)  # every part of the residual written once
    assert rel_err(split, one) < 1e-6
    assert torch.equal(split, again)
