"""Prefill's element-wise work on CPU as inductor kernels (with `cpu_compile`).

A 2,048-token prefill step of SmolLM2 spends ~0.3-0.4 s of its ~1.7 s outside the matmuls
and attention: SiLU·mul, the residual add + RMSNorm (each a handful of passes over
[T, hidden] with a temporary per pass) and rotary embedding, all memory-bound. Compiled with
dynamic shapes, each becomes one or two vectorized loops; the decode graph (compiled_decode.py)
fuses the same ops itself, so the layers call these only outside a dynamo trace. Each function
is compiled once for any number of tokens (two graphs: one token, and more), in `warm_up`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CpuFusedOps"]


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # [T, 2 * I] -> each [T, I]
    return F.silu(gate) * up


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x [T, hidden]: float32 math, as HF (and as RMSNorm's eager path)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual
    return _rms_norm(x, weight, eps), x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, D]; cos, sin [T, 1, D] (HF's rotate_half layout)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


class CpuFusedOps:
    def __init__(self) -> None:
        # Not fullgraph: past dynamo's recompile limit a function then runs eagerly instead
        # of failing the step (there is nothing in them to break the graph anyway).
        compile_ = torch.compile(dynamic=True)
        self.silu_mul = compile_(_silu_mul)
        self.rms_norm = compile_(_rms_norm)
        self.add_rms_norm = compile_(_add_rms_norm)
        self.rotate_qk = compile_(_rotate_qk)

    def warm_up(self, hidden_size: int, intermediate_size: int, num_heads: int,
                num_kv_heads: int, head_dim: int, eps: float, dtype: torch.dtype) -> None:
        """Compile for 1 and for 2+ tokens now, rather than under the first prompts (and with
        the model's eps: a float argument is a constant of the graph)."""
        # Made outside inference mode, like the model's weights: the graphs are guarded on
        # the tensors' dispatch keys, and an inference tensor here would recompile later.
        weight = torch.ones(hidden_size, dtype=dtype)
        with torch.inference_mode():
            for num_tokens in (1, 3):
                # Separate tensors where the model's are (guards note aliasing and offsets).
                x = torch.randn(num_tokens, hidden_size).to(dtype)
                residual = torch.randn(num_tokens, hidden_size).to(dtype)
                self.silu_mul(torch.randn(num_tokens, 2 * intermediate_size).to(dtype))
                self.rms_norm(x, weight, eps)
                self.add_rms_norm(x, residual, weight, eps)
                # q and k as the model has them: views into one fused qkv row per token.
                q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
                qkv = torch.randn(num_tokens, q_size + 2 * kv_size).to(dtype)
                q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
                cos = torch.randn(num_tokens, 1, head_dim).to(dtype)
                sin = torch.randn(num_tokens, 1, head_dim).to(dtype)
                self.rotate_qk(q.view(num_tokens, num_heads, head_dim),
                               k.view(num_tokens, num_kv_heads, head_dim), cos, sin)
