"""CPU decode steps through `torch.compile` (inductor): the model's whole forward as one graph.

Why: on a CPU a decode step of a small model is ~1,500 small torch ops (norms, rotary, residual
adds, KV store and gather, attention plumbing), and their dispatch (4–8 µs each) costs about as
much as reading the weights. Inductor fuses the element-wise work into a few C++ loops per layer
and calls the matmuls and SDPA as extern kernels, so the step is left with the weight reads.

Shapes are dynamic in the batch size and the context length, so traffic never triggers a
compile: one graph serves every batch of two or more sequences and one serves a single sequence
(dynamo specializes sizes of 1). `warm_up` compiles both at start-up; inductor's on-disk cache
makes later starts faster. The attention plan (slots, masks) is built outside the graph from host
metadata, with the whole context as one chunk, so the graph does not change as contexts grow.

bf16 linears on our GEMM kernel (kernels/cpu_gemm.c) are the opaque op `tokenfleet::cpu_gemm`
on weights packed once at load. Without that kernel, bf16 weights are *frozen* (inductor's
`freezing`: weights become constants that inductor packs for oneDNN itself), which is what our
eager oneDNN prepack does by hand; dynamo cannot trace oneDNN's packed tensors. Prefill and
mixed steps stay eager: their shapes vary too much to compile once, and their GEMMs are
compute-bound anyway.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import cast

import torch
from torch._inductor import config as inductor_config
from torch.fx.experimental import _config as fx_config

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.layers.attention_torch import TorchAttentionBackend

__all__ = ["CompiledDecode"]

ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class CompiledDecode:
    def __init__(self, forward: ForwardFn, backend: TorchAttentionBackend, num_blocks: int,
                 block_size: int, sliding_window: int | None, freeze: bool):
        self.backend = backend
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.num_steps = 0  # decode steps served (warm-up excluded)
        # fullgraph: a graph break would silently bring back the per-op dispatch this removes.
        # Guards on module attributes are dropped: nothing in the model changes after
        # warm-up, and evaluating them (every parameter of every layer) took ~1 ms a step.
        # Guards on the inputs (sizes, dtypes) stay: they pick the batch-1 or the batch-n graph.
        # Dynamo keeps its compiled graphs per code object, and without the module guards a
        # second engine in the process would run the first one's graph (its frozen weights):
        # hence a private copy of the code object per engine.
        self._forward: ForwardFn = torch.compile(
            _with_own_code(forward), dynamic=True, fullgraph=True,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        # Read by inductor when it compiles (in warm_up): `options={"freezing": ...}` passed to
        # torch.compile is ignored for freezing (checked in the generated code: no oneDNN).
        self._freeze = freeze

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions [S] (one decode row per sequence) -> hidden [S, hidden]
        assert meta.is_decode_only, "prefill and mixed steps run eagerly"
        self.backend.plan(meta, self.num_blocks, self.block_size, self.sliding_window,
                          input_ids.device, kv_chunk=max(1, meta.max_seq_len))
        hidden = self._forward(input_ids, positions, meta)
        self.num_steps += 1
        return hidden

    @torch.inference_mode()
    def warm_up(self, max_num_seqs: int) -> None:
        """Compile both graphs now (a batch of 1 and of 2) rather than under traffic.

        The warm-up steps write K/V into slot 2 of block 0: nothing is cached yet, and
        a sequence that is later given block 0 writes its own keys there before reading them.
        Contexts are 3 tokens long, not 1, so the context length is not specialized either,
        and duck sizing is off, so sizes that happen to be equal here are not assumed equal."""
        # fx's `patch` is added to its config module at import time: mypy cannot see it.
        no_duck_sizing = fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
        with no_duck_sizing, inductor_config.patch(freezing=self._freeze):
            for num_seqs in sorted({1, min(2, max_num_seqs)}):
                self._warm_up_step(num_seqs, context_len=3)
        self.num_steps = 0

    def _warm_up_step(self, num_seqs: int, context_len: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_seqs,), context_len - 1, dtype=torch.int64),
            # Two columns, not one: the C decode kernel takes the block tables into the graph,
            # and a width of 1 would be specialized (a recompile at the second block).
            block_tables=torch.zeros(num_seqs, 2, dtype=torch.int32),
            query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
            seq_lens=torch.full((num_seqs,), context_len, dtype=torch.int32),
            max_query_len=1,
            max_seq_len=context_len,
            is_decode_only=True,
            query_start_loc_cpu=list(range(num_seqs + 1)),
            seq_lens_cpu=[context_len] * num_seqs,
        )
        positions = torch.full((num_seqs,), context_len - 1, dtype=torch.int64)
        self(torch.zeros(num_seqs, dtype=torch.int64), positions, meta)


def _with_own_code(forward: ForwardFn) -> ForwardFn:
    """`forward` (a bound method) rebuilt on a copy of its code object."""
    assert isinstance(forward, types.MethodType), "expects a model's bound forward"
    func = forward.__func__
    clone = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__,
                               func.__defaults__, func.__closure__)
    return cast(ForwardFn, types.MethodType(clone, forward.__self__))
