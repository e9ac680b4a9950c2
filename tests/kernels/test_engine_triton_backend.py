"""The engine with attention_backend="triton" (interpreted on CPU) generates what "torch" does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfleet.engine import LLM, SamplingParams
from tokenfleet.engine.layers.attention import Attention

# Interpreted on the CPU (CI); on a GPU the same comparisons run on CUDA, eagerly so that the
# kernels are called from Python each step (graph replays would bypass the swaps below).
ON_DEVICE: dict[str, object] = (dict(device="cuda", cuda_graph_max_batch=0)
                                if torch.cuda.is_available() else {})


def test_triton_backend_matches_torch_backend(tiny_llama_dir: Path) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (7, 21)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_kv_blocks=64,
                  attention_backend=backend, max_num_batched_tokens=16,  # chunked prefill
                  **ON_DEVICE)
        layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
        used = {m.backend.name for m in layers}
        assert used == {backend}
        outputs[backend] = [c.token_ids for c in llm.generate(prompts, params)]
        assert llm.engine.block_manager.num_free_blocks == 64
    assert outputs["triton"] == outputs["torch"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_norm_and_rotary_kernels_in_the_model(
    tiny_llama_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path's Triton RMSNorm(+residual), rotary and SiLU·mul, run inside the model
    (interpreted on CPU), give the torch path's tokens. With the Triton attention backend the
    rotary runs fused with the KV store (one kernel per layer); with the torch backend it
    rotates q/k views of the fused qkv output in place."""
    from tokenfleet.engine.layers import attention_triton
    from tokenfleet.engine.layers.norm import RMSNorm
    from tokenfleet.engine.layers.rotary import RotaryEmbedding
    from tokenfleet.engine.models.llama import LlamaMLP

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 13)]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    args = dict(dtype="float32", block_size=4, num_kv_blocks=64, attention_backend="torch",
                **ON_DEVICE)
    expected = [c.token_ids for c in LLM(str(tiny_llama_dir), **args).generate(prompts, params)]
    llm = LLM(str(tiny_llama_dir), **{**args, "attention_backend": backend})
    fused = [m for m in llm.engine.runner.model.modules()
             if isinstance(m, RMSNorm | RotaryEmbedding | LlamaMLP)]
    assert len(fused) > 3
    for m in fused:
        m.use_kernel = True
    num_fused_calls = 0
    real_rotary_store_kv = attention_triton.rotary_store_kv

    def counting(*a: torch.Tensor) -> None:
        nonlocal num_fused_calls
        num_fused_calls += 1
        real_rotary_store_kv(*a)

    monkeypatch.setattr(attention_triton, "rotary_store_kv", counting)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    num_layers = sum(isinstance(m, Attention) for m in llm.engine.runner.model.modules())
    if backend == "triton":
        assert num_fused_calls >= num_layers * 5  # every layer, every step
    else:
        assert num_fused_calls == 0


def test_norms_fused_into_the_decode_gemvs(tiny_llama_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`fused_decode_gemv` (kernels/norm_gemv.py in one-row steps, interpreted here) gives the
    torch path's tokens, and runs for each layer's two norms, its o_proj (a plain GEMV) and
    its SiLU·mul at every one-row step."""
    from tokenfleet.engine.layers.norm import RMSNorm
    from tokenfleet.engine.layers.rotary import RotaryEmbedding
    from tokenfleet.engine.models.llama import LlamaMLP
    from tokenfleet.kernels import norm_gemv

    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (4, 11)]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    args = dict(dtype="float32", block_size=4, num_kv_blocks=64, **ON_DEVICE)
    expected = [LLM(str(tiny_llama_dir), attention_backend="torch", **args)
                .generate([p], params)[0].token_ids for p in prompts]
    llm = LLM(str(tiny_llama_dir), attention_backend="triton", **args)
    for m in llm.engine.runner.model.modules():
        if isinstance(m, RMSNorm | RotaryEmbedding | LlamaMLP):
            m.use_kernel = True
    llm.engine.runner.set_fused_decode_gemv(True)
    num_calls = 0
    real = norm_gemv.norm_gemv

    def counting(*a: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal num_calls
        num_calls += 1
        return real(*a, **kw)  # type: ignore[arg-type]

    num_silu_calls = 0
    real_silu = norm_gemv.silu_mul_gemv

    def counting_silu(*a: object, **kw: object) -> torch.Tensor:
        nonlocal num_silu_calls
        num_silu_calls += 1
        return real_silu(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(norm_gemv, "norm_gemv", counting)
    monkeypatch.setattr(norm_gemv, "silu_mul_gemv", counting_silu)
    got = [llm.generate([p], params)[0].token_ids for p in prompts]  # one row per decode step
    assert got == expected
    num_layers = sum(isinstance(m, Attention) for m in llm.engine.runner.model.modules())
    num_one_row_steps = 4 * len(prompts)  # 4 decode steps of one row each
    assert num_calls == 3 * num_layers * num_one_row_steps
    assert num_silu_calls == num_layers * num_one_row_steps
