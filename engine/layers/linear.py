"""Linear layers whose parameters know how to load themselves from a checkpoint.

Packed layers (q/k/v in one matrix, gate/up in one) run one GEMM instead of three or two;
each checkpoint tensor is copied into its slice by the parameter's `weight_loader`.
Tensor-parallel sharding and quantization will replace these modules as transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenfleet.engine.errors import ModelLoadError
from tokenfleet.kernels.cpu_gemm import CpuGemm, cpu_gemm

__all__ = ["Linear", "PackedLinear", "WeightLoader"]

WeightLoader = Callable[[torch.Tensor, "str | int | None"], None]


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelLoadError(
            f"shape mismatch for {what}: checkpoint has {tuple(src.shape)}, "
            f"model expects {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(src)


class Linear(nn.Module):
    # Packed copies of `weight` set by `prepack_cpu_linears` (CPU bf16): for our C kernel
    # (`cpu_gemm` + `gemm_weight`), or else for oneDNN (`mkldnn_weight`).
    cpu_gemm: CpuGemm | None = None
    gemm_weight: torch.Tensor | None = None
    mkldnn_weight: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.weight.weight_loader = self._load  # type: ignore[attr-defined]
        if self.bias is not None:
            self.bias.weight_loader = self._load  # type: ignore[attr-defined]

    def _load_into(self, param: torch.Tensor, loaded: torch.Tensor,
                   shard: str | int | None) -> None:
        _copy_checked(param, loaded, "linear")

    def _load(self, loaded: torch.Tensor, shard: str | int | None = None) -> None:
        param = self.weight if loaded.dim() == 2 else self.bias
        assert param is not None
        self._load_into(param, loaded, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in_features] -> [T, out_features]
        if self.cpu_gemm is not None:
            assert self.gemm_weight is not None
            return cpu_gemm(self.cpu_gemm, x, self.gemm_weight, self.bias, self.out_features)
        if self.mkldnn_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.mkldnn_weight, self.bias, "none",
                                                      [], "")
        return F.linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """Several projections of the same input stacked along the output dim (q|k|v, gate|up)."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], shard_names: Sequence[str | int],
                 bias: bool = False):
        super().__init__(in_features, sum(out_sizes), bias)
        offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        self.shards = {name: (off, size) for name, off, size in zip(
            shard_names, offsets, out_sizes, strict=True)}

    def _load_into(self, param: torch.Tensor, loaded: torch.Tensor,
                   shard: str | int | None) -> None:
        if shard not in self.shards:
            raise ModelLoadError(f"unknown shard {shard!r} for packed linear")
        offset, size = self.shards[shard]
        _copy_checked(param.narrow(0, offset, size), loaded, f"shard {shard!r}")
