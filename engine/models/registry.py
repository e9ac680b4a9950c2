"""HF `architectures` name -> model class. One Llama implementation covers the family."""

from __future__ import annotations

from tokenfleet.engine.errors import UnsupportedModelError
from tokenfleet.engine.models.causal_lm import CausalLM
from tokenfleet.engine.models.llama import LlamaForCausalLM

__all__ = ["MODEL_REGISTRY", "CausalLM", "model_class"]

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
