"""Weight-only int8 (per-output-channel symmetric scales), bf16 activations, on CPU.

Decode at small batch is bound by reading weights: int8 halves the bytes of bf16. The matmul
is our kernel (`kernels/cpu_qgemm.c`, where the CPU has AVX-512 BF16), else torch's
`_weight_int8pack_mm` (fast only with bf16 activations, so bf16 is required), slower than
ours (`benchmarks/bench_cpu_gemm.py --quant` times them with the int4 layers).
Like TGI's `--quantize eetq`/bitsandbytes-int8, outputs are close to, not equal to, bf16's.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.layers.linear import Linear
from tokenfleet.kernels.cpu_qgemm import PANEL_COLUMNS, CpuQGemm, cpu_q8_gemm

__all__ = ["Int8WeightOnlyLinear", "quantize_int8_weight_only"]


class Int8WeightOnlyLinear(nn.Module):
    # With our kernel: packed_q8 + fp32 scales. Without: weight_int8 + bf16 scales (torch's).
    packed_q8: torch.Tensor  # [ceil(out / 48), in / 2, 96] int8 (cpu_gemm.c's panel layout)
    weight_int8: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # ours: [ceil(out / 48) * 48] fp32 (zero padded); torch's: [out] bf16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 qgemm: CpuQGemm | None = None):
        super().__init__()
        w = weight.detach().float()  # [out, in]
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.out_features = w.shape[0]
        self.qgemm = qgemm if w.shape[1] % 2 == 0 else None  # our kernel takes k-pairs
        if self.qgemm is not None:
            padded = -(-self.out_features // PANEL_COLUMNS) * PANEL_COLUMNS
            self.register_buffer("packed_q8", self.qgemm.pack_q8(q))
            self.register_buffer("scales", torch.nn.functional.pad(
                scales, (0, padded - self.out_features)).contiguous())
        else:
            self.register_buffer("weight_int8", q.contiguous())
            self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, in] bf16 -> [T, out] bf16
        if self.qgemm is not None:
            return cpu_q8_gemm(self.qgemm, x, self.packed_q8, self.scales, self.bias,
                               self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return y if self.bias is None else y + self.bias


def quantize_int8_weight_only(model: nn.Module, device: torch.device, dtype: torch.dtype,
                              qgemm: CpuQGemm | None = None) -> int:
    """Replace every `Linear` (incl. the LM head) in place, on our kernel when `qgemm` is
    given; returns how many were replaced."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        raise ValidationError("quantize='int8' needs device='cpu' and dtype='bfloat16'")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    for name, module in targets:
        model.set_submodule(name, Int8WeightOnlyLinear(module.weight, module.bias, qgemm))
    return len(targets)
