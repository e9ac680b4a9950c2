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
