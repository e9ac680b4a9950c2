"""CPU decode through torch.compile: same tokens as eager, and no compile after start-up.

Each engine here compiles two graphs (batch 1 and batch >= 2) at construction; on the tiny
2-layer models that takes seconds, not the minutes of a 30-layer model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from tokenfleet.engine import LLMEngine, SamplingParams
from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.outputs import StepOutput
from tokenfleet.kernels import cpu_gemm


def _run_staggered(engine: LLMEngine, prompts: list[list[int]], lengths: list[int]
                   ) -> dict[str, list[int]]:
    """Add one request per step so the decode batch size rises and falls (1 .. all)."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(zip(prompts, lengths, strict=True)))
    while pending or engine.has_unfinished():
        if pending:
            i, (prompt, n) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
        out: StepOutput
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
    return tokens


def _traffic(vocab: int, num: int, seed: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 40, (num,), generator=g)]
    lengths = [int(n) for n in torch.randint(1, 30, (num,), generator=g)]
    return prompts, lengths


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("mistral", {"sliding_window": 8}),  # the window is applied in the plan, outside the graph
    ("qwen2", {}),  # q/k/v bias
])
def test_compiled_decode_matches_eager_and_never_recompiles(
        tmp_path: Path, make_tiny_llama: Callable[..., Path], arch: str,
        overrides: dict[str, Any]) -> None:
    model_dir = make_tiny_llama(tmp_path, arch=arch, **overrides)
    args: dict[str, Any] = {"dtype": "float32", "max_num_seqs": 6, "block_size": 4}
    eager = LLMEngine.from_model(str(model_dir), **args)
    compiled = LLMEngine.from_model(str(model_dir), cpu_compile=True, **args)
    decode = compiled.runner.compiled_decode
    assert decode is not None
    graphs_after_warm_up = counters["stats"]["unique_graphs"]

    prompts, lengths = _traffic(eager.model_config.vocab_size, 10, seed=1)
    want = _run_staggered(eager, prompts, lengths)
    got = _run_staggered(compiled, prompts, lengths)

    assert got == want  # float32: fusion changes rounding by ~1e-7, never a greedy choice here
    assert decode.num_steps > sum(lengths) // 6  # decode steps really took the compiled path
    # Batch sizes 1..6 and contexts across many 4-token blocks: all served by the two graphs.
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up


@pytest.mark.parametrize("quantize,gemm_kernel", [(None, True), (None, False), ("int4", True)],
                         ids=["bf16", "bf16-onednn", "int4"])
def test_compiled_bf16_decode_tracks_eager_logits(tmp_path: Path,
                                                  make_tiny_llama: Callable[..., Path],
                                                  quantize: str | None, gemm_kernel: bool) -> None:
    """bf16 (every linear on our GEMM kernel, an opaque op in the graph; or, without it, frozen
    weights with the LM head outside the graph packed for oneDNN by us) and bf16 + int4: each
    compiled step's log-prob of its token equals the eager model's for the same context up to
    bf16 rounding (teacher-forced on the compiled side's tokens)."""
    model_dir = make_tiny_llama(tmp_path)
    args: dict[str, Any] = {"dtype": "bfloat16", "quantize": quantize, "max_num_seqs": 2,
                            "cpu_gemm_kernel": gemm_kernel}
    eager = LLMEngine.from_model(str(model_dir), **args)
    compiled = LLMEngine.from_model(str(model_dir), cpu_compile=True, **args)
    down_proj = compiled.runner.model.model.layers[0].mlp.down_proj
    lm_head = compiled.runner.model.lm_head
    if quantize is None and gemm_kernel and down_proj.cpu_gemm is None:
        assert cpu_gemm.load(tmp_path) is None  # only where the kernel cannot be built
    elif quantize is None and gemm_kernel:
        assert lm_head.gemm_weight is not None and down_proj.gemm_weight is not None
        assert down_proj.weight.numel() == 0  # one copy of the weights: no freezing
    elif quantize is None:
        assert getattr(lm_head, "mkldnn_weight", None) is not None
        assert down_proj.mkldnn_weight is None
    prompt = list(range(5, 25))
    compiled.add_request("a", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    got = []
    while compiled.has_unfinished():
        for out in compiled.step():
            got.extend(out.tokens)
    assert len(got) == 12
    for i, tok in enumerate(got):
        expected = torch.log_softmax(eager.score(prompt + [t.id for t in got[:i]]), -1)
        assert abs(tok.logprob - float(expected[tok.id])) < 0.05, (i, tok, expected[tok.id])
        assert float(expected.max() - expected[tok.id]) < 0.05  # greedy up to rounding
    assert compiled.runner.compiled_decode is not None
    assert compiled.runner.compiled_decode.num_steps == len(got) - 1


def test_cpu_compile_is_refused_off_the_cpu_path() -> None:
    with pytest.raises(ValidationError, match="cpu_compile"):
        LLMEngine.from_model("unused", device="cuda", cpu_compile=True)
    with pytest.raises(ValidationError, match="cpu_compile"):
        LLMEngine.from_model("unused", attention_backend="triton", cpu_compile=True)
