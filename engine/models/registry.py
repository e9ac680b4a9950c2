"""HF `architectures` name -> model class. One Llama implementation covers the family."""

from __future__ import annotations

from torch import nn

from tokenfleet.engine.errors import UnsupportedModelError
from tokenfleet.engine.models.llama import LlamaForCausalLM

__all__ = ["MODEL_REGISTRY", "model_class"]

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
