"""Weight-only int8 (per-output-channel symmetric scales), bf16 activations, on CPU.

Decode at small batch is bound by reading weights: int8 halves the bytes of bf16. The matmul
is torch's `_weight_int8pack_mm` (fast only with bf16 activations, so bf16 is required).
Like TGI's `--quantize eetq`/bitsandbytes-int8, outputs are close to, not equal to, bf16's.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.layers.linear import Linear

__all__ = ["Int8WeightOnlyLinear", "quantize_int8_weight_only"]


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()  # [out, in]
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in] bf16 -> [T, out] bf16
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return y if self.bias is None else y + self.bias


def quantize_int8_weight_only(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Replace every `Linear` (incl. the LM head) in place; returns how many were replaced."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValidationError("quantize='int8' needs device='cpu' and dtype='bfloat16'")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    for name, module in targets:
        model.set_submodule(name, Int8WeightOnlyLinear(module.weight, module.bias))
    return len(targets)
