"""Weight-only int4 (asymmetric, one scale and zero per 32 input channels), bf16 activations.

Decode at batch 1 on a CPU reads every weight once per token: 4.5 bits instead of 16 move
~3.5× fewer bytes. The matmul is torch's `_weight_int4pack_mm_for_cpu` (AVX-512 where there
is one). The grid is llama.cpp's Q4_1 (w = d·q + m, q in 0..15, blocks of 32 along the input
dimension), so weights that came from a Q4_1 GGUF — the default model — are represented
exactly again, up to the bf16 rounding of scale and zero. Other weights lose what any 4-bit
quantization loses (TGI's `--quantize awq/gptq` are the GPU analogues).

The LM head gets weight-only int8 instead (per output channel): the output projection is the
layer most sensitive to quantization (llama.cpp's Q4_1 files keep it in Q8_0 too). Layers whose
input size is not a multiple of 32 stay in bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.layers.linear import Linear
from tokenfleet.engine.quant.int8_weight_only import Int8WeightOnlyLinear

__all__ = ["GROUP_SIZE", "Int4WeightOnlyLinear", "quantize_int4_weight_only"]

GROUP_SIZE = 32
_INNER_K_TILES = 2  # torch's packing: K must be a multiple of 16 * inner_k_tiles = 32


class Int4WeightOnlyLinear(nn.Module):
    weight_int4: torch.Tensor  # [out, in / 2] uint8, torch's packed int4 layout
    scales_and_zeros: torch.Tensor  # [in / 32, out, 2] bf16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out_features, in_features = weight.shape
        assert in_features % GROUP_SIZE == 0, "caller keeps such layers in bf16"
        groups = weight.detach().float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, in / 32]
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        q = q.to(torch.int32).view(out_features, in_features)
        # torch's convention: w = (q - 8) * scale + zero, so zero = low + 8 * scale.
        scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1)  # [out, in/32, 2]
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(
            q, _INNER_K_TILES))
        self.register_buffer("scales_and_zeros",
                             scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16))
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in] bf16 -> [T, out] bf16
        y = torch._weight_int4pack_mm_for_cpu(x, self.weight_int4, GROUP_SIZE,
                                              self.scales_and_zeros)
        return y if self.bias is None else y + self.bias


def quantize_int4_weight_only(model: nn.Module, device: torch.device, dtype: torch.dtype,
                              lm_head: str = "lm_head") -> int:
    """Replace every eligible `Linear` in place (the one named `lm_head` with int8); returns
    how many became int4."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValidationError("quantize='int4' needs device='cpu' and dtype='bfloat16'")
    num_int4 = 0
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
        if name == lm_head:
            model.set_submodule(name, Int8WeightOnlyLinear(module.weight, module.bias))
        elif module.weight.shape[1] % GROUP_SIZE == 0:
            model.set_submodule(name, Int4WeightOnlyLinear(module.weight, module.bias))
            num_int4 += 1
    return num_int4
