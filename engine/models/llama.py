"""The Llama family in one file: Llama 2/3, Mistral (sliding window), Qwen2 (qkv bias), SmolLM2.

Input is a flat batch of tokens from many sequences ([T] ids and positions); attention finds
each sequence's context through the paged KV cache (see AttentionMetadata).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from tokenfleet.engine.config import ModelConfig
from tokenfleet.engine.layers.attention import Attention
from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.layers.cpu_fused import CpuFusedOps
from tokenfleet.engine.layers.linear import Linear, PackedLinear
from tokenfleet.engine.layers.norm import RMSNorm
from tokenfleet.engine.layers.rotary import RopeTable, RotaryEmbedding
from tokenfleet.engine.models.causal_lm import CausalLM

__all__ = ["LlamaForCausalLM"]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.qkv_proj = PackedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     ["q", "k", "v"], bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, d, cfg.sliding_window)

    def forward(self, rope: RopeTable, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x [T, hidden] -> qkv [T, q_size + 2 * kv_size]
        return self.attend(rope, self.qkv_proj(x), meta)

    def attend(self, rope: RopeTable, qkv: torch.Tensor, meta: AttentionMetadata
               ) -> torch.Tensor:
        """The layer after its QKV projection: qkv [T, q_size + 2 * kv_size] -> [T, hidden]."""
        return self.o_proj(self.attention(rope, qkv, meta))

    def attention(self, rope: RopeTable, qkv: torch.Tensor, meta: AttentionMetadata
                  ) -> torch.Tensor:
        """qkv [T, q_size + 2 * kv_size] -> the heads' outputs [T, q_size], before o_proj."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.attn(q, k, v, meta, rope)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = PackedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, [0, 1],
                                         bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        # Fused Triton SiLU·mul: None = on CUDA tensors only (True: tests under the interpreter).
        self.use_kernel: bool | None = None
        self.cpu_fused: CpuFusedOps | None = None  # set by the runner with cpu_compile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if self.cpu_fused is not None and not torch.compiler.is_compiling():
            return self.down_proj(self.cpu_fused.silu_mul(gate_up))
        if gate_up.is_cuda if self.use_kernel is None else self.use_kernel:
            from tokenfleet.kernels.silu_mul import silu_mul

            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # each [T, intermediate]
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # One-row steps compute each norm, and SiLU·mul, inside the GEMV after it, and o_proj
        # in the same GEMV (kernels/norm_gemv.py): set by the runner with `fused_decode_gemv`
        # on CUDA (tests: under the interpreter).
        self.fused_gemv = False

    def forward(self, rope: RopeTable, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_gemv and x.shape[0] == 1:
            return self._forward_fused_gemv(rope, x, residual, meta)
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def _forward_fused_gemv(self, rope: RopeTable, x: torch.Tensor,
                            residual: torch.Tensor | None, meta: AttentionMetadata
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        from tokenfleet.kernels.norm_gemv import norm_gemv, silu_mul_gemv

        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        qkv_proj, gate_up_proj = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        qkv, residual = norm_gemv(x, ln1.weight, ln1.eps, qkv_proj.weight, qkv_proj.bias,
                                  residual)  # [1, q_size + 2 * kv_size]
        # o_proj in the same GEMV without a norm: cuBLAS adds a split-K reduce kernel here at
        # one row (gpu_check times both: the kernel rows "o_proj" and the "1 fused-gemv" A/B).
        o_proj = self.self_attn.o_proj
        h, _ = norm_gemv(self.self_attn.attention(rope, qkv, meta), None, 0.0, o_proj.weight,
                         o_proj.bias)  # [1, hidden]
        gate_up, residual = norm_gemv(h, ln2.weight, ln2.eps, gate_up_proj.weight,
                                      gate_up_proj.bias, residual)  # [1, 2 * intermediate]
        down = self.mlp.down_proj
        return silu_mul_gemv(gate_up, down.weight, down.bias), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                      cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions [T] -> hidden [T, hidden]
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    # checkpoint name -> (our packed parameter, shard id)
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Tensor parallelism (engine/tensor_parallel.py): heads and the MLP's intermediate dim
    # split across ranks (two all-reduces a layer, after o_proj and down_proj), and the
    # vocabulary (embedding rows: one all-reduce a step; LM head rows: one gather).
    tensor_parallel_plan: ClassVar[dict[str, str]] = {
        "qkv_proj": "column", "gate_up_proj": "column", "o_proj": "row", "down_proj": "row",
        "embed_tokens": "vocab", "lm_head": "vocab",
    }

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = cast(nn.Parameter, self.model.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [N, hidden] -> logits [N, vocab] (only rows that are sampled)
        logits = self.lm_head(hidden)
        return logits if self.gather_logits is None else self.gather_logits(logits)
