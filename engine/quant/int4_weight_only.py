"""Weight-only int4 (asymmetric, one scale and zero per 32 input channels), bf16 activations.

Decode at batch 1 on a CPU reads every weight once per token: 5 bits instead of 16 move
~3.2× fewer bytes. The matmul is our kernel (`kernels/cpu_qgemm.c`, where the CPU has AVX-512
BF16; d and m kept in fp16 like the GGUF's), else torch's `_weight_int4pack_mm_for_cpu` (d
and the zero in bf16): with the int8 LM head, 1.4-1.6x slower at one row and 2.3-2.4x at 32
on the dev VM (`benchmarks/bench_cpu_gemm.py --quant`).
The grid is llama.cpp's Q4_1 (w = d·q + m, q in 0..15, blocks of 32 along the input
dimension), so weights that came from a Q4_1 GGUF — the default model — are represented
exactly again, up to the rounding of scale and zero (fp16 on our kernel, bf16 on torch's).
Other weights lose what any 4-bit quantization loses (TGI's `--quantize awq/gptq` are the GPU
analogues).

The LM head gets weight-only int8 instead (per output channel): the output projection is the
layer most sensitive to quantization (llama.cpp's Q4_1 files keep it in Q8_0 too). Layers whose
input size is not a multiple of 32 stay in bf16 (on torch's kernel, also those whose output
size is not a multiple of 16).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.layers.linear import Linear
from tokenfleet.engine.quant.int8_weight_only import Int8WeightOnlyLinear
from tokenfleet.kernels.cpu_qgemm import CpuQGemm, cpu_q4_gemm

__all__ = ["GROUP_SIZE", "Int4WeightOnlyLinear", "quantize_int4_weight_only"]

GROUP_SIZE = 32
_INNER_K_TILES = 2  # torch's packing: K must be a multiple of 16 * inner_k_tiles = 32


class Int4WeightOnlyLinear(nn.Module):
    # With our kernel: packed_q4. Without: weight_int4 + scales_and_zeros (torch's kernel).
    packed_q4: torch.Tensor  # [ceil(out / 48), in / 32, 960] uint8 (cpu_qgemm.c's layout)
    weight_int4: torch.Tensor  # [out, in / 2] uint8, torch's int4pack layout
    scales_and_zeros: torch.Tensor  # [in / 32, out, 2] bf16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 qgemm: CpuQGemm | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        assert in_features % GROUP_SIZE == 0, "caller keeps such layers in bf16"
        groups = weight.detach().float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, in / 32]
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        q = q.to(torch.int32).view(out_features, in_features)
        self.qgemm = qgemm
        if qgemm is not None:
            self.register_buffer("packed_q4", qgemm.pack_q4(q, scale, low))
        else:
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
        if self.qgemm is not None:
            return cpu_q4_gemm(self.qgemm, x, self.packed_q4, self.bias, self.out_features)
        y = torch._weight_int4pack_mm_for_cpu(x, self.weight_int4, GROUP_SIZE,
                                              self.scales_and_zeros)
        return y if self.bias is None else y + self.bias


def quantize_int4_weight_only(model: nn.Module, device: torch.device, dtype: torch.dtype,
                              qgemm: CpuQGemm | None = None, lm_head: str = "lm_head") -> int:
    """Replace every eligible `Linear` in place (the one named `lm_head` with int8), on our
    kernels when `qgemm` is given; returns how many became int4."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValidationError("quantize='int4' needs device='cpu' and dtype='bfloat16'")
    num_int4 = 0
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
        if name == lm_head:
            model.set_submodule(name, Int8WeightOnlyLinear(module.weight, module.bias, qgemm))
        elif _int4_eligible(module.weight.shape, qgemm is not None):
            model.set_submodule(name, Int4WeightOnlyLinear(module.weight, module.bias, qgemm))
            num_int4 += 1
    return num_int4


def _int4_eligible(shape: torch.Size, our_kernel: bool) -> bool:
    """Whole groups along K; torch's packing also needs N a multiple of 16 (ours any N)."""
    out_features, in_features = shape
    return in_features % GROUP_SIZE == 0 and (our_kernel or out_features % 16 == 0)
