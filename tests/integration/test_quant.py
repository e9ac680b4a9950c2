"""Weight-only int8: close to bf16 (not equal), and the default model still answers right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfleet.engine import LLM, LLMEngine, SamplingParams
from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.quant.int8_weight_only import Int8WeightOnlyLinear


def test_int8_logits_track_bf16_and_answer(smollm2_dir: Path) -> None:
    bf16 = LLMEngine.from_model(str(smollm2_dir), dtype="bfloat16")
    int8 = LLM(str(smollm2_dir), dtype="bfloat16", quantize="int8")
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in int8.engine.runner.model.modules())
    prompt = int8.encode("What is the capital of France?", chat=True)
    a, b = bf16.score(prompt), int8.engine.score(prompt)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert int(a.argmax()) == int(b.argmax())
    out = int8.generate("What is the capital of France?", SamplingParams(max_new_tokens=12),
                        chat=True)[0]
    assert "Paris" in out.text


def test_int8_needs_cpu_bf16(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValidationError, match="bfloat16"):
        LLMEngine.from_model(str(tiny_llama_dir), dtype="float32", quantize="int8")
    with pytest.raises(ValidationError, match="quantize"):
        LLMEngine.from_model(str(tiny_llama_dir), quantize="int4")


def test_worker_settings_reach_the_engine(tiny_llama_dir: Path) -> None:
    from tokenfleet.worker.engine_factory import build_engine
    from tokenfleet.worker.settings import WorkerSettings

    settings = WorkerSettings(model=str(tiny_llama_dir), device="cpu", dtype="bfloat16",
                              quantize="int8")
    engine = build_engine(settings)
    assert isinstance(engine, LLMEngine) and engine.config.quantize == "int8"
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in engine.runner.model.modules())
