"""Engine and model configuration: validated once, derived values computed once, passed around."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenfleet.engine.errors import UnsupportedModelError, ValidationError
from tokenfleet.engine.hub import DEFAULT_CACHE_DIR

__all__ = ["ATTENTION_BACKENDS", "MAX_SPECULATE", "EngineConfig", "ModelConfig"]

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
MAX_SPECULATE = 16  # draft tokens a step; beyond it a verify step costs more than it saves
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """The subset of an HF `config.json` the Llama-family model needs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    o_proj_bias: bool = False  # Llama's `attention_bias` biases o_proj too; Qwen2's never
    mlp_bias: bool = False  # Llama's `mlp_bias`: gate, up and down projections

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        if not archs:
            raise UnsupportedModelError("config.json has no `architectures` entry")
        act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):  # the MLP is SiLU-gated: anything else would be wrong
            raise UnsupportedModelError(
                f"hidden_act {act!r} is not supported (the Llama-family MLP here is SiLU-gated)")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        model_type = hf.get("model_type", "llama")
        # Qwen2 always has qkv bias; Llama/Mistral only when `attention_bias` says so.
        bias = bool(hf.get("attention_bias", model_type == "qwen2"))
        rope_theta, rope_scaling = _rope(hf)
        window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry a window they do not use unless enabled
        return cls(
            architecture=archs[0],
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bias,
            sliding_window=int(window) if window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            o_proj_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either config layout: transformers 4 writes `rope_theta` and
    `rope_scaling`; transformers 5 writes one `rope_parameters` dict holding both."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return theta, (scaling if kind != "default" else None)
    return float(hf.get("rope_theta", 10000.0)), hf.get("rope_scaling")


@dataclass
class EngineConfig:
    """Everything the engine needs; `LLMEngine.from_model(**engine_args)` builds one."""

    model: str
    model_dir: Path | None = None  # resolved HF directory (set by the loader)
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None  # used when num_kv_blocks is None
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    cache_dir: Path | None = None
    num_threads: int | None = None  # CPU intra-op threads; None = torch's default
    cpu_prepack: bool = True  # packed bf16 weights on CPU (see layers/cpu_prepack.py)
    # CPU linears through our C kernels (AVX-512 BF16 CPUs; same build as the other kernels):
    # bf16 in kernels/cpu_gemm.c instead of oneDNN (a 32-sequence decode step's GEMMs 1.24x,
    # batch 1's 1.44x faster); int4/int8 in kernels/cpu_qgemm.c instead of torch's kernels.
    cpu_gemm_kernel: bool = True
    # CPU decode steps through torch.compile (see compiled_decode.py): int4 decode ~1.5x and
    # bf16 ~1.2x faster here, for ~1.5 min of compiling at start-up (two graphs; ~3.5 min
    # in bf16 on oneDNN, whose weights inductor freezes and packs).
    cpu_compile: bool = False
    # CPU attention (decodes, and prompts up to 4,096 keys) through kernels/cpu_paged_decode.c
    # (built with the system C compiler at start-up, ~1 s; without one the engine keeps the
    # torch gather + SDPA path).
    cpu_attention_kernel: bool = True
    # CPU: the sampler's argmax + logsumexp through kernels/cpu_row_stats.c (same build; a
    # greedy 32-row step's sampler 5.6 -> 0.5 ms, benchmarks/bench_cpu_step_parts.py).
    cpu_sampler_kernel: bool = True
    quantize: str | None = None  # None, "int8" or "int4" (weight-only, CPU bf16)
    # Decode batches up to this size replay CUDA graphs (CUDA with a graph-safe attention
    # backend only); 0 = always eager. Capped at max_num_seqs.
    cuda_graph_max_batch: int = 128
    # Queue decode step N+1 on the device before reading step N's tokens back, so that the
    # host's per-token work overlaps the next forward (graph-replayed decode steps only).
    async_decode: bool = True
    # CUDA, experimental: one-row steps compute each RMSNorm inside the QKV / gate-up GEMV
    # that follows it and SiLU·mul inside the down GEMV (kernels/norm_gemv.py), each shape's
    # tiles (or cuBLAS, where it is faster) chosen by timing at the graph warm-up. H100,
    # 2026-11-27: 161.5 vs 159.1 batch-1 decode tok/s, the same replay GPU time within 0.3 %:
    # off until a run shows more (benchmarks/gpu_check.sh A/Bs it). Ignored on CPU.
    fused_decode_gemv: bool = False
    # Split every layer across this many processes (one device each on CUDA; the CPU's cores
    # shared between them on CPU): heads and the MLP split Megatron-style, two all-reduces
    # a layer (engine/tensor_parallel.py); every rank replays the same CUDA graphs.
    tensor_parallel_size: int = 1
    # Speculative decoding (TGI's --speculate): up to this many draft tokens a step for each
    # decoding sequence, found by n-gram lookup in its own context (engine/ngram_proposer.py)
    # and verified in one forward; the output is the same tokens as without it. 0 = off.
    # Sequences with a grammar or a penalty are not speculated; with it on, decode steps are
    # not queued ahead (async_decode), since the drafts follow the last token.
    speculate: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValidationError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValidationError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        self._check_counts()
        if self.quantize not in (None, "int8", "int4"):
            raise ValidationError(
                f"quantize must be None, 'int8' or 'int4', got {self.quantize!r}")
        if self.attention_backend == "flash_attn" and self.block_size % 256:
            raise ValidationError(
                "attention_backend='flash_attn' reads the paged KV cache in blocks of a multiple "
                f"of 256 tokens: set block_size=256 (got {self.block_size})")
        if self.cpu_compile and (self.device != "cpu"
                                 or self.attention_backend not in ("auto", "torch")):
            raise ValidationError(
                "cpu_compile applies to device='cpu' with the torch attention backend "
                "(CUDA decode replays CUDA graphs instead)")
        if self.tensor_parallel_size > 1 and self.cpu_compile:
            raise ValidationError("cpu_compile does not support tensor_parallel_size > 1")

    def _check_counts(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise ValidationError(f"{name} must be positive")
        if self.tensor_parallel_size < 1:
            raise ValidationError("tensor_parallel_size must be >= 1")
        if self.cuda_graph_max_batch < 0:
            raise ValidationError("cuda_graph_max_batch must be >= 0 (0 = no CUDA graphs)")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValidationError("num_kv_blocks must be positive")
        if not 0 <= self.speculate <= MAX_SPECULATE:
            raise ValidationError(f"speculate must be in [0, {MAX_SPECULATE}], "
                                  f"got {self.speculate}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def kernel_dir(self) -> Path:
        """Where the CPU's C kernels are built and cached: `<cache_dir>/kernels`."""
        return Path(self.cache_dir or DEFAULT_CACHE_DIR) / "kernels"
