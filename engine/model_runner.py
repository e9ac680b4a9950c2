"""Owns the device: the model, the KV cache, and turning a scheduled batch into tensors.

For each step it builds the flat token batch (ids, positions), the slot mapping and block
tables, runs the model, computes logits only for rows that are sampled (the last row of a
sequence whose prefill is complete, or its decode row), and samples.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from tokenfleet.engine.compiled_decode import CompiledDecode
from tokenfleet.engine.config import EngineConfig, ModelConfig
from tokenfleet.engine.cuda_graph_runner import CudaGraphRunner
from tokenfleet.engine.layers.attention import Attention, make_backend
from tokenfleet.engine.layers.attention_torch import TorchAttentionBackend
from tokenfleet.engine.layers.cpu_fused import CpuFusedOps
from tokenfleet.engine.layers.cpu_prepack import needs_freezing
from tokenfleet.engine.models.registry import CausalLM
from tokenfleet.engine.prompt_logprobs import prompt_logprobs, prompt_targets
from tokenfleet.engine.sampler import Sampler, SamplerOutput
from tokenfleet.engine.sampling_batch import SamplingBatch
from tokenfleet.engine.scheduler import ScheduledBatch
from tokenfleet.engine.sequence import Sequence
from tokenfleet.engine.step_inputs import StepInputs
from tokenfleet.engine.tensor_parallel_workers import TensorParallelWorkers
from tokenfleet.kernels import cpu_paged_decode
from tokenfleet.kernels.cpu_paged_decode import CpuPagedDecode

__all__ = ["LaunchedDecode", "ModelRunner", "RunOutput"]

_DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(slots=True)
class RunOutput:
    sampled_seqs: list[Sequence]  # sequences that got a new token this step
    sampler_output: SamplerOutput | None
    # Prompt log-probs for sequences that asked (decoder_input_details): seq -> {pos: logprob}
    prompt_logprobs: dict[int, list[tuple[int, float]]]


@dataclass(slots=True)
class LaunchedDecode:
    """A decode step queued on the device whose sampled tokens are not read back yet."""

    seqs: list[Sequence]
    next_input: torch.Tensor  # [n] int64 on the device: the sampled ids, next step's input
    host: SamplerOutput  # host copies of the sampler output, valid once `wait()` returned
    ready: torch.cuda.Event | None  # recorded after the copies (None on CPU: already done)

    def wait(self) -> SamplerOutput:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this step only, not for steps queued later
        return self.host


class ModelRunner:
    """`model_config` is this rank's (local head counts under tensor parallelism); `tp`, on
    rank 0 of a tensor-parallel engine, the other ranks, which mirror every forward."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: CausalLM,
                 tp: TensorParallelWorkers | None = None):
        self.config = config
        self.model_config = model_config
        self.model = model
        self.tp = tp
        # Under tensor parallelism the fused one-row GEMVs (which bypass the row-parallel
        # all-reduce) stay off; compiled decode is refused by the config.
        single = config.tensor_parallel_size == 1
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.sampler = Sampler.for_device(self.device, config)
        if self.device.type == "cuda":  # the Triton row stats compile here, not at a request
            self.sampler.warm_up(model_config.vocab_size, config.torch_dtype, self.device)
        self.num_kv_blocks = self._num_kv_blocks()
        self.backend = make_backend(config.attention_backend, self.device,
                                    self._cpu_decode_kernel())
        self._allocate_kv_cache()
        self.compiled_decode: CompiledDecode | None = None
        if config.cpu_compile:
            assert isinstance(self.backend, TorchAttentionBackend)
            self._fuse_cpu_element_wise()
            self.compiled_decode = CompiledDecode(
                model.forward, self.backend, self.num_kv_blocks, self.block_size,
                model_config.sliding_window,
                freeze=config.quantize is None and needs_freezing(model))
            self.compiled_decode.warm_up(config.max_num_seqs)
        if config.fused_decode_gemv and self.device.type == "cuda" and single:
            self.set_fused_decode_gemv(True)
        self.graph_runner: CudaGraphRunner | None = None
        # Under tensor parallelism every rank captures the same graphs (their all-reduces
        # inside), in the same order, and replays them in lockstep (`_run_graph_logits`).
        if self.device.type == "cuda" and self.backend.supports_cuda_graphs \
                and config.cuda_graph_max_batch > 0:
            self.graph_runner = self.make_graph_runner(use_graphs=True)
            with torch.cuda.device(self.device):  # capture on the model's device
                self.graph_runner.capture_all()

    # ---- set-up ----------------------------------------------------------------------------
    def set_fused_decode_gemv(self, on: bool) -> None:
        """One-row steps with each RMSNorm and SiLU·mul inside the GEMV after it (models that
        offer it); graphs captured before keep what they captured."""
        for module in self.model.modules():
            if hasattr(module, "fused_gemv"):  # a decoder layer
                cast(Any, module).fused_gemv = on

    def _fuse_cpu_element_wise(self) -> None:
        """Prefill's element-wise ops as compiled kernels (layers/cpu_fused.py)."""
        mc = self.model_config
        fused = CpuFusedOps()
        fused.warm_up(mc.hidden_size, mc.intermediate_size, mc.num_heads, mc.num_kv_heads,
                      mc.head_dim, mc.rms_norm_eps, self.config.torch_dtype)
        for module in self.model.modules():
            if hasattr(module, "cpu_fused"):  # RMSNorm, RotaryEmbedding, a model's MLP
                cast(Any, module).cpu_fused = fused

    def _cpu_decode_kernel(self) -> CpuPagedDecode | None:
        """The C decode-attention kernel, built on first use into the cache directory; None
        off CPU, when disabled, for other dtypes, or when it cannot be built here."""
        config = self.config
        if self.device.type != "cpu" or not config.cpu_attention_kernel \
                or config.torch_dtype not in (torch.bfloat16, torch.float32):
            return None
        return cpu_paged_decode.load(config.kernel_dir)

    def _kv_bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty(0, dtype=self.config.torch_dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            # Tensors freed while loading (the full vocabulary a rank sliced) sit in torch's
            # cache and would count as used.
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = int(free - total * (1 - self.config.gpu_memory_utilization))
        if budget is None:
            budget = _DEFAULT_CPU_KV_BYTES
        num_blocks = max(1, budget // self._kv_bytes_per_block())
        if self.config.tensor_parallel_size > 1:  # rank 0's block ids must fit every rank
            count = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count.item())
        return num_blocks

    def _allocate_kv_cache(self) -> None:
        mc = self.model_config
        shape = (self.num_kv_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in layers:
            # Zeros, not empty: padded reads of unused slots must stay finite (0 * NaN = NaN).
            layer.k_cache = torch.zeros(shape, dtype=self.config.torch_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.config.torch_dtype, device=self.device)
            layer.backend = self.backend

    def make_graph_runner(self, use_graphs: bool) -> CudaGraphRunner:
        """Static-buffer decode runner (`use_graphs=False` runs it eagerly: tests on CPU)."""
        mc, max_len = self.model_config, self.config.max_model_len
        assert max_len is not None, "LLMEngine resolves max_model_len before the runner"
        max_batch = min(self.config.max_num_seqs, self.config.cuda_graph_max_batch)
        return CudaGraphRunner(
            self.model, max_batch=max_batch, max_blocks_per_seq=-(-max_len // self.block_size),
            max_seq_len=max_len, device=self.device, use_graphs=use_graphs,
            launch_config=lambda num_seqs: self.backend.decode_launch_config(
                num_seqs, mc.num_kv_heads, mc.head_dim, max_len, self.device))

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> RunOutput:
        if self.replayable(batch):
            return self._run_graph(batch.seqs)
        inputs, sampled = StepInputs.from_batch(batch, self.block_size)
        targets = prompt_targets(batch)
        inputs.logit_rows = [row for _, row, _, _ in targets] + inputs.sample_rows
        with self._mirrored(inputs):
            input_ids, positions, meta = inputs.to_device(self.device)
            if self.compiled_decode is not None and meta.is_decode_only:
                hidden = self.compiled_decode(input_ids, positions, meta)  # [S, hidden]
            else:
                hidden = self.model(input_ids, positions, meta)  # [T, hidden]
            logits = self._logits(hidden, inputs.logit_rows)  # [P + S, vocab]
        by_seq = prompt_logprobs(targets, logits) if targets else {}
        if not sampled:
            return RunOutput([], None, by_seq)
        assert logits is not None
        return RunOutput(sampled, self._sample(logits[len(targets):], sampled), by_seq)

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
        # hidden [T, hidden] -> logits [len(rows), vocab] (None for no rows)
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[index])

    def can_replay(self, num_seqs: int) -> bool:
        runner = self.graph_runner
        return runner is not None and runner.bucket_for(num_seqs) is not None

    @torch.inference_mode()
    def launch_decode(self, seqs: list[Sequence], prev: LaunchedDecode | None = None
                      ) -> LaunchedDecode:
        """Queue a decode step (graph replay + sampling) without waiting for it.

        With `prev`, the input tokens are prev's samples, taken on the device (`seqs` must be
        a subsequence of `prev.seqs`, in order), so this step can be queued before prev's
        tokens reach the host."""
        token_ids: list[int] | torch.Tensor = [s.last_token_id for s in seqs]
        if prev is not None:
            rows = {id(s): i for i, s in enumerate(prev.seqs)}
            picked = [rows[id(s)] for s in seqs]
            token_ids = prev.next_input
            if picked != list(range(len(prev.seqs))):
                index = torch.tensor(picked)
                if self.device.type == "cuda":  # pinned + non-blocking: no wait for prev
                    index = index.pin_memory().to(self.device, non_blocking=True)
                token_ids = prev.next_input.index_select(0, index)
        out = self._run_graph_logits(seqs, token_ids)
        sampled = self._sample(out, seqs)
        if self.device.type != "cuda":
            return LaunchedDecode(seqs, sampled.token_ids, sampled, None)
        host = SamplerOutput(
            token_ids=_to_host_async(sampled.token_ids),
            logprobs=_to_host_async(sampled.logprobs),
            top_ids=_to_host_async(sampled.top_ids) if sampled.top_ids is not None else None,
            top_logprobs=(_to_host_async(sampled.top_logprobs)
                          if sampled.top_logprobs is not None else None))
        ready = torch.cuda.Event()
        ready.record()
        return LaunchedDecode(seqs, sampled.token_ids, host, ready)

    def replayable(self, batch: ScheduledBatch) -> bool:
        """A decode-only step whose batch fits a captured graph."""
        return (self.can_replay(len(batch.seqs))
                and all(n == 1 for n in batch.num_new_tokens)
                and all(s.num_computed_tokens + 1 == s.num_tokens for s in batch.seqs))

    def _run_graph(self, seqs: list[Sequence]) -> RunOutput:
        logits = self._run_graph_logits(seqs, [s.last_token_id for s in seqs])
        return RunOutput(seqs, self._sample(logits, seqs), {})

    def _run_graph_logits(self, seqs: list[Sequence], token_ids: list[int] | torch.Tensor
                          ) -> torch.Tensor:  # [n, vocab]
        assert self.graph_runner is not None
        bs = self.block_size
        positions = [s.num_computed_tokens for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions,
                                                                    strict=True)]
        tables = [s.block_table for s in seqs]
        if self.tp is None:
            return self.graph_runner.run(token_ids, positions, slots, tables)
        on_device = isinstance(token_ids, torch.Tensor)
        # Ids still on the device go by broadcast (zeros hold their places in the message).
        inputs = StepInputs.for_decode([0] * len(seqs) if on_device else list(token_ids),
                                       positions, slots, tables)
        with self.tp.step(inputs, decode=True, broadcast_ids=on_device):
            if isinstance(token_ids, torch.Tensor):  # the other ranks' input ids, on-device
                token_ids = token_ids.to(torch.int64).contiguous()
                dist.broadcast(token_ids, src=0)
            return self.graph_runner.run(token_ids, positions, slots, tables)

    def _sample(self, logits: torch.Tensor, sampled: list[Sequence]) -> SamplerOutput:
        sbatch = SamplingBatch.for_sequences(sampled, self.model_config.vocab_size,
                                             self.device)
        return self.sampler(logits, sbatch)

    @torch.inference_mode()
    def last_logits(self, seq: Sequence) -> torch.Tensor:
        """Logits [vocab] after all of `seq`'s tokens, in one prefill (a verification aid:
        the caller allocated `seq`'s blocks and frees them afterwards)."""
        inputs, _ = StepInputs.from_batch(ScheduledBatch([seq], [seq.num_uncomputed_tokens]),
                                          self.block_size)
        inputs.logit_rows = inputs.sample_rows  # the last row
        with self._mirrored(inputs):
            logits = self._logits(self.model(*inputs.to_device(self.device)), inputs.logit_rows)
        assert logits is not None
        return logits[0].float()

    def _mirrored(self, inputs: StepInputs) -> AbstractContextManager[None]:
        """Around rank 0's forward: the other tensor-parallel ranks run the same step."""
        return self.tp.step(inputs) if self.tp is not None else nullcontext()

    @torch.inference_mode()
    def run_shard(self, inputs: StepInputs) -> None:
        """A step on a tensor-parallel rank other than 0: the forward only (rank 0 samples)."""
        input_ids, positions, meta = inputs.to_device(self.device)
        self._logits(self.model(input_ids, positions, meta), inputs.logit_rows)  # a split head

    @torch.inference_mode()
    def run_shard_decode(self, inputs: StepInputs, broadcast_ids: bool) -> None:
        """Rank 0's graph-replayed decode step, on another rank: the same bucket, replayed
        with the same inputs (the ids from rank 0's device when it never read them back)."""
        assert self.graph_runner is not None, "rank 0 replays graphs this rank lacks"
        token_ids: list[int] | torch.Tensor = inputs.token_ids
        if broadcast_ids:
            token_ids = torch.empty(len(inputs.positions), dtype=torch.int64, device=self.device)
            dist.broadcast(token_ids, src=0)
        self.graph_runner.run(token_ids, inputs.positions, inputs.slots, inputs.block_tables)

    def enable_static_decode(self) -> None:
        """Decode steps through the static-buffer runner, eagerly (no graphs), on every rank:
        the graph path's logic on a CPU (tests)."""
        if self.tp is not None:
            self.tp.call("enable_static_decode")
        self.graph_runner = self.make_graph_runner(use_graphs=False)
        self.graph_runner.capture_all()


def _to_host_async(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
