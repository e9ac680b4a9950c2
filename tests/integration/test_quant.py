"""Weight-only int8: close to bf16 (not equal), and the default model still answers right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfleet.engine import LLM, LLMEngine, SamplingParams
from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.quant.int4_weight_only import Int4WeightOnlyLinear
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


def test_int4_is_lossless_on_q4_1_weights(smollm2_dir: Path) -> None:
    """SmolLM2 ships as Q4_1 (its embedding/LM head as Q8_0): int4 on the same grid gets the
    layer weights back up to the bf16 rounding of scale and zero, so int4's logits are about as
    far from the float32 truth as plain bf16's (1 - cosine: bf16 3e-5..5e-4, int4 ~1.5e-4
    here), where 4 bits off the grid cost ~100x more (next test)."""
    fp32 = LLMEngine.from_model(str(smollm2_dir), dtype="float32")
    bf16 = LLMEngine.from_model(str(smollm2_dir), dtype="bfloat16")
    int4 = LLM(str(smollm2_dir), dtype="bfloat16", quantize="int4")
    quantized = [m for m in int4.engine.runner.model.modules()
                 if isinstance(m, Int4WeightOnlyLinear)]
    assert len(quantized) == 4 * 30  # every projection of the 30 layers
    assert isinstance(int4.engine.runner.model.lm_head, Int8WeightOnlyLinear)  # Q8_0 in the file
    cos = torch.nn.functional.cosine_similarity
    for text in ("What is the capital of France?", "Write a haiku about the sea."):
        prompt = int4.encode(text, chat=True)
        truth, plain, quant = fp32.score(prompt), bf16.score(prompt), int4.engine.score(prompt)
        assert 1 - cos(truth, plain, dim=0) < 1e-3  # the bf16 noise this is compared with
        assert 1 - cos(truth, quant, dim=0) < 5e-4
        assert int(quant.argmax()) in truth.topk(2).indices.tolist()  # near-ties may swap


def test_int4_on_other_weights_is_close(tiny_llama_dir: Path) -> None:
    # Random float weights are not on a 4-bit grid: close, not equal.
    layer = torch.nn.Linear(64, 48)
    weight = layer.weight.detach().to(torch.bfloat16)
    q = Int4WeightOnlyLinear(weight, None)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = x.float() @ weight.float().t()
    rel = (q(x).float() - ref).norm() / ref.norm()
    assert 1e-2 < rel < 0.15


def test_int8_needs_cpu_bf16(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValidationError, match="bfloat16"):
        LLMEngine.from_model(str(tiny_llama_dir), dtype="float32", quantize="int8")
    with pytest.raises(ValidationError, match="bfloat16"):
        LLMEngine.from_model(str(tiny_llama_dir), dtype="float32", quantize="int4")
    with pytest.raises(ValidationError, match="quantize"):
        LLMEngine.from_model(str(tiny_llama_dir), quantize="int3")


def test_worker_settings_reach_the_engine(tiny_llama_dir: Path) -> None:
    from tokenfleet.worker.engine_factory import build_engine
    from tokenfleet.worker.settings import WorkerSettings

    settings = WorkerSettings(model=str(tiny_llama_dir), device="cpu", dtype="bfloat16",
                              quantize="int8")
    engine = build_engine(settings)
    assert isinstance(engine, LLMEngine) and engine.config.quantize == "int8"
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in engine.runner.model.modules())


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_our_kernels_and_torchs_agree(smollm2_dir: Path, quantize: str) -> None:
    """The same quantized model on our C kernels (the default where the CPU has AVX-512 BF16)
    and on torch's (`cpu_gemm_kernel=False`, the fallback elsewhere): same grid, scales kept
    at different precisions (fp16/fp32 vs bf16), so nearly the same logits: 1 - cosine was
    3e-5..3.3e-3 on three prompts, the spread of bf16 itself around float32 (2e-5..2.4e-3).
    (Which one is nearer the unquantized product is tested per layer, in test_cpu_qgemm.)"""
    ours = LLMEngine.from_model(str(smollm2_dir), dtype="bfloat16", quantize=quantize)
    stock = LLMEngine.from_model(str(smollm2_dir), dtype="bfloat16", quantize=quantize,
                                 cpu_gemm_kernel=False)
    assert all(getattr(m, "qgemm", None) is None for m in stock.runner.model.modules())
    for text in ("The capital of France is", "Write a haiku about the sea."):
        prompt = stock.tokenizer.encode(text)
        a, b = ours.score(prompt), stock.score(prompt)
        assert 1 - torch.nn.functional.cosine_similarity(a, b, dim=0) < 6e-3
        assert int(a.argmax()) in b.topk(2).indices.tolist()  # near-ties may swap
