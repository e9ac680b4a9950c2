"""The engine with attention_backend="triton" (interpreted on CPU) generates what "torch" does."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenfleet.engine import LLM, SamplingParams
from tokenfleet.engine.layers.attention import Attention


def test_triton_backend_matches_torch_backend(tiny_llama_dir: Path) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (7, 21)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_kv_blocks=64,
                  attention_backend=backend, max_num_batched_tokens=16)  # chunked prefill
        layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
        used = {m.backend.name for m in layers}
        assert used == {backend}
        outputs[backend] = [c.token_ids for c in llm.generate(prompts, params)]
        assert llm.engine.block_manager.num_free_blocks == 64
    assert outputs["triton"] == outputs["torch"]


def test_fused_norm_and_rotary_kernels_in_the_model(tiny_llama_dir: Path) -> None:
    """The CUDA path's Triton RMSNorm(+residual), in-place rotary on q/k views of the fused
    qkv output and SiLU·mul, run inside the model (interpreted on CPU), give the torch path's
    tokens."""
    from tokenfleet.engine.layers.norm import RMSNorm
    from tokenfleet.engine.layers.rotary import RotaryEmbedding
    from tokenfleet.engine.models.llama import LlamaMLP

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 13)]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    args = dict(dtype="float32", block_size=4, num_kv_blocks=64, attention_backend="triton")
    expected = [c.token_ids for c in LLM(str(tiny_llama_dir), **args).generate(prompts, params)]
    llm = LLM(str(tiny_llama_dir), **args)
    fused = [m for m in llm.engine.runner.model.modules()
             if isinstance(m, RMSNorm | RotaryEmbedding | LlamaMLP)]
    assert len(fused) > 3
    for m in fused:
        m.use_kernel = True
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
