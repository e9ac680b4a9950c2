"""Linear layers whose parameters know how to load themselves from a checkpoint.

Packed layers (q/k/v in one matrix, gate/up in one) run one GEMM instead of three or two;
each checkpoint tensor is copied into its slice by the parameter's `weight_loader`.
Under tensor parallelism (engine/tensor_parallel.py) a linear loads only its rank's slice of
each checkpoint tensor: output rows ("column parallel", `tp_dim` 0) or input columns ("row
parallel", `tp_dim` 1).
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
    # Tensor parallelism: which dim of the checkpoint tensors is split (None: not split).
    tp_dim: int | None = None
    tp_rank: int = 0
    tp_size: int = 1

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
        if self.tp_dim is not None and self.tp_size > 1:
            loaded = self._rank_slice(loaded, shard)
        self._load_into(param, loaded, shard)

    def _local_rows(self, shard: str | int | None) -> int:
        return self.out_features

    def _rank_slice(self, loaded: torch.Tensor, shard: str | int | None) -> torch.Tensor:
        """This rank's part of a full checkpoint tensor."""
        if self.tp_dim == 1 and loaded.dim() == 1:
            # A row-parallel bias is added once, after the sum: by rank 0.
            return loaded if self.tp_rank == 0 else torch.zeros_like(loaded)
        dim = self.tp_dim
        assert dim is not None
        local = self._local_rows(shard) if dim == 0 else self.in_features
        if loaded.shape[dim] != local * self.tp_size:
            raise ModelLoadError(
                f"shape mismatch for a tensor-parallel linear: checkpoint has "
                f"{tuple(loaded.shape)}, expected {local * self.tp_size} along dim {dim} "
                f"({self.tp_size} ranks of {local})")
        return loaded.narrow(dim, self.tp_rank * local, local)

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

    def _local_rows(self, shard: str | int | None) -> int:
        if shard not in self.shards:
            raise ModelLoadError(f"unknown shard {shard!r} for packed linear")
        return self.shards[shard][1]

    def _load_into(self, param: torch.Tensor, loaded: torch.Tensor,
                   shard: str | int | None) -> None:
        if shard not in self.shards:
            raise ModelLoadError(f"unknown shard {shard!r} for packed linear")
        offset, size = self.shards[shard]
        _copy_checked(param.narrow(0, offset, size), loaded, f"shard {shard!r}")
