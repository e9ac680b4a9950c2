"""RMSNorm with an optional fused residual add (HF Llama semantics, computed in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenfleet.engine.layers.cpu_fused import CpuFusedOps

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        # Fused Triton kernel: None = on CUDA tensors only (True: tests under the interpreter).
        self.use_kernel: bool | None = None
        self.cpu_fused: CpuFusedOps | None = None  # set by the runner with cpu_compile

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new_residual) where new_residual = x (+ residual)."""
        # x, residual: [T, hidden]
        if x.is_cuda if self.use_kernel is None else self.use_kernel:
            from tokenfleet.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        fused = self.cpu_fused
        if fused is not None and not torch.compiler.is_compiling():
            weight = self.weight.detach()  # a Parameter would be guarded on its identity
            if residual is None:
                return fused.rms_norm(x, weight, self.eps), x
            return fused.add_rms_norm(x, residual, weight, self.eps)
        if residual is not None:
            x = x + residual
        residual = x
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # float32, like HF
        return self.weight * normed.to(x.dtype), residual
