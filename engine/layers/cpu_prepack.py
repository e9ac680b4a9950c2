"""CPU transform: keep bf16 linear weights in oneDNN's blocked layout.

Plain `F.linear` re-reads a row-major bf16 matrix for each GEMV and reaches ~12–23 GB/s on
this class of CPU; the prepacked layout (what inductor's `freezing` does) ran 1.3–1.7×
faster in microbenchmarks (DESIGN.md §6b). Applied to a finished model, like every feature.
"""

from __future__ import annotations

from collections.abc import Container

import torch
from torch import nn

from tokenfleet.engine.layers.linear import Linear

__all__ = ["cpu_prepack_supported", "prepack_cpu_linears"]


def cpu_prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def prepack_cpu_linears(model: nn.Module, only: Container[str] | None = None) -> int:
    """Pack every Linear's weight (or those named in `only`); free the row-major copy unless
    another module shares it (a tied LM head shares the embedding). Returns the number of
    layers packed."""
    shared = _shared_weight_ids(model)
    num_packed = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.dtype != torch.bfloat16 \
                or (only is not None and name not in only):
            continue
        module.mkldnn_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.data, None)
        if id(module.weight) not in shared:
            module.weight.data = torch.empty(0, dtype=module.weight.dtype)
        num_packed += 1
    return num_packed


def _shared_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
