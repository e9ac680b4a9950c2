"""CPU transform: keep bf16 linear weights packed for a faster GEMM.

Plain `F.linear` re-reads a row-major bf16 matrix for each GEMV and reaches ~12–23 GB/s on
this class of CPU. Two packed layouts, picked per engine:
- our C kernel's panels (`kernels/cpu_gemm.c`, where the CPU has AVX-512 BF16): the faster one
  at decode sizes (a 32-sequence step's GEMMs 1.24x, a batch-1 step's 1.44x faster than
  oneDNN's), equal on prefill; dynamo traces it as an opaque custom op, so `cpu_compile`
  keeps these weights too;
- oneDNN's blocked layout otherwise (1.3–1.7× faster than row-major, DESIGN.md §6b); dynamo
  cannot trace those tensors, so with `cpu_compile` only the LM head (outside the graph) is
  packed and inductor packs its own frozen copy of the rest.
Applied to a finished model, like every feature. The row-major copy is freed unless another
module shares it (a tied LM head shares the embedding).
"""

from __future__ import annotations

from collections.abc import Container

import torch
from torch import nn

from tokenfleet.engine.config import EngineConfig
from tokenfleet.engine.layers.linear import Linear
from tokenfleet.kernels import cpu_gemm
from tokenfleet.kernels.cpu_gemm import CpuGemm

__all__ = ["cpu_prepack_supported", "needs_freezing", "pack_cpu_linears", "prepack_cpu_linears"]


def pack_cpu_linears(model: nn.Module, config: EngineConfig) -> None:
    """The engine's choice: our kernel's layout when `cpu_gemm_kernel` is on and it builds here,
    else oneDNN's; nothing unless the model is bf16 on a CPU oneDNN supports."""
    if not cpu_prepack_supported(torch.device(config.device), config.torch_dtype):
        return
    gemm = cpu_gemm.load(config.kernel_dir) if config.cpu_gemm_kernel else None
    # With oneDNN, compiled decode packs the graph's frozen weights itself (dynamo cannot
    # trace oneDNN's packed tensors); the LM head runs outside the graph, so it is packed here
    # either way (plain `mm` on the tied weight took 7.6 ms of a 49 ms step at 32 sequences).
    only = {"lm_head"} if config.cpu_compile and gemm is None else None
    prepack_cpu_linears(model, gemm, only)


def cpu_prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's bf16 path is usable here (our kernel's availability is `cpu_gemm.load`'s)."""
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def prepack_cpu_linears(model: nn.Module, gemm: CpuGemm | None = None,
                        only: Container[str] | None = None) -> int:
    """Pack every bf16 Linear's weight (or those named in `only`) for `gemm`, or for oneDNN
    when it is None. Returns the number of layers packed."""
    shared = _shared_weight_ids(model)
    num_packed = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.dtype != torch.bfloat16 \
                or (only is not None and name not in only):
            continue
        if gemm is not None:
            module.cpu_gemm = gemm
            module.gemm_weight = gemm.pack(module.weight.data)
        else:
            module.mkldnn_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.data,
                                                                           None)
        if id(module.weight) not in shared:
            module.weight.data = torch.empty(0, dtype=module.weight.dtype)
        num_packed += 1
    return num_packed


def needs_freezing(model: nn.Module) -> bool:
    """Some Linear runs on plain weights (or oneDNN's, which dynamo cannot trace): compiled
    decode should freeze them so that inductor packs them itself. Not when every Linear is on
    our kernel: there is nothing left to pack, and no second copy of the weights is made."""
    return any(isinstance(m, Linear) and m.cpu_gemm is None for m in model.modules())


def _shared_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
