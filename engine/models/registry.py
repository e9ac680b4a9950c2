"""HF `architectures` name -> model class. One Llama implementation covers the family."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from tokenfleet.engine.errors import UnsupportedModelError
from tokenfleet.engine.models.llama import LlamaForCausalLM

__all__ = ["MODEL_REGISTRY", "CausalLM", "model_class"]


class CausalLM(Protocol):
    """What the model runner needs from a model."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: object
                 ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def modules(self) -> Iterator[nn.Module]: ...

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
