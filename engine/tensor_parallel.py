"""Tensor parallelism (Megatron-style) as transforms on a plain model.

Each of `size` ranks holds 1/size of every attention head group and of the MLP's intermediate
dimension: the QKV and gate/up projections are split by output rows ("column parallel"), the
o_proj and down projections by input columns ("row parallel"), whose partial outputs are summed
across ranks with one all-reduce each — two a layer. The vocabulary is split too: each rank
holds 1/size of the embedding's rows (a token's row comes from the rank that has it, through
one more all-reduce) and of the LM head's (each rank computes its columns of the logits, which
are then gathered). Norms are replicated. So a rank's model is the ordinary model built from
a config with its local head and intermediate counts (`shard_model_config`), plus linears that
load their slice of each checkpoint tensor (`plan_tensor_parallel`, before loading), an
all-reduce after the row-parallel ones (`wrap_row_parallel`) and the vocabulary split
(`shard_vocab`), both after loading; quantization and CPU prepacking then see plain Linears.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenfleet.engine.config import ModelConfig
from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.layers.linear import Linear
from tokenfleet.engine.models.causal_lm import CausalLM
from tokenfleet.kernels.cpu_shm_allreduce import ShmGroup

__all__ = ["RowParallelReduce", "VocabParallelEmbedding", "all_reduce", "init_process_group",
           "plan_tensor_parallel", "rendezvous_store", "shard_model_config", "shard_vocab",
           "use_shm_group", "wrap_row_parallel"]

# A collective waits at most this long for the other ranks (one layer's work, normally
# milliseconds). Idle ranks wait on a pipe, not in a collective, so this is no idle limit.
_COLLECTIVE_TIMEOUT = timedelta(seconds=300)


class _Comm:
    """This process's way to sum across ranks: CPU ranks of one machine use shared memory
    (kernels/cpu_shm_allreduce.c: microseconds, where gloo's TCP takes ~1 ms), others
    torch.distributed (NCCL on CUDA). Every rank of a group makes the same choice (rank 0
    decides and the others fail to start if they cannot follow)."""

    shm: ShmGroup | None = None
    is_alive: Callable[[], None] = staticmethod(lambda: None)


def use_shm_group(group: ShmGroup | None, is_alive: Callable[[], None]) -> None:
    """Sum through `group` from now on (None: back to torch.distributed); `is_alive` raises
    when a peer died (called while a wait lasts)."""
    _Comm.shm, _Comm.is_alive = group, is_alive


def all_reduce(t: torch.Tensor) -> None:
    """Sum `t` over the ranks, in place."""
    if _Comm.shm is not None and t.dtype in (torch.float32, torch.bfloat16) \
            and t.is_contiguous():
        _Comm.shm.all_reduce(t, _Comm.is_alive)
    else:
        dist.all_reduce(t)


def shard_model_config(mc: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's model: heads and intermediate size divided by `size`.

    Raises ValidationError when the model cannot be split that way."""
    if size == 1:
        return mc
    for name, value in (("num_attention_heads", mc.num_heads),
                        ("num_key_value_heads", mc.num_kv_heads),
                        ("intermediate_size", mc.intermediate_size)):
        if value % size:
            raise ValidationError(
                f"tensor_parallel_size={size} must divide the model's {name} ({value})")
    return dataclasses.replace(mc, num_heads=mc.num_heads // size,
                               num_kv_heads=mc.num_kv_heads // size,
                               intermediate_size=mc.intermediate_size // size)


def plan_tensor_parallel(model: nn.Module, rank: int, size: int) -> None:
    """Tell each split linear which slice of its checkpoint tensors to load (before loading).

    The model class names its split linears in `tensor_parallel_plan` (module name ->
    "column" | "row"); every other parameter is replicated."""
    plan: dict[str, str] = getattr(model, "tensor_parallel_plan", {})
    if size > 1 and not plan:
        raise ValidationError(f"{type(model).__name__} does not support tensor parallelism")
    for name, module in model.named_modules():
        kind = plan.get(name.rsplit(".", 1)[-1])
        if kind not in ("column", "row"):
            continue  # "vocab" is split after loading (shard_vocab)
        assert isinstance(module, Linear), f"{name} in the plan is not a Linear"
        module.tp_dim = 0 if kind == "column" else 1
        module.tp_rank, module.tp_size = rank, size


class RowParallelReduce(nn.Module):
    """A row-parallel linear whose partial output is summed across the ranks."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)  # [T, out_features], this rank's share of the sum
        all_reduce(out)
        return out


def wrap_row_parallel(model: nn.Module) -> None:
    """Put an all-reduce after every row-parallel linear (after loading, before quantizing)."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, Linear) and module.tp_dim == 1 and module.tp_size > 1]
    for name in names:
        model.set_submodule(name, RowParallelReduce(model.get_submodule(name)))


def all_gather_columns(t: torch.Tensor) -> torch.Tensor:
    """[N, c] on each rank -> [N, size * c]: rank r's columns at r * c."""
    rank, size = dist.get_rank(), dist.get_world_size()
    if _Comm.shm is not None and t.dtype in (torch.float32, torch.bfloat16):
        # A sum where every other rank contributes zeros is exact, and the shared-memory sum
        # is the fast path here: no separate gather.
        out = torch.zeros(t.shape[0], size, t.shape[1], dtype=t.dtype, device=t.device)
        out[:, rank] = t
        flat = out.view(t.shape[0], size * t.shape[1])
        all_reduce(flat)
        return flat
    t = t.contiguous()
    if t.is_cuda:  # one output buffer: the simplest collective to capture in a CUDA graph
        gathered = torch.empty(size * t.shape[0], t.shape[1], dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(gathered, t)  # [size * N, c], rank-major
        return gathered.view(size, t.shape[0], t.shape[1]).permute(1, 0, 2).reshape(
            t.shape[0], size * t.shape[1])
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=-1)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + rows) of the embedding: other ids look up zeros, and
    the sum over the ranks gives every id its row."""

    def __init__(self, weight: nn.Parameter, start: int):
        super().__init__()
        self.weight = weight  # [rows, hidden]
        self.start = start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start  # [T]
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, hidden]
        out.masked_fill_(outside[:, None], 0)
        all_reduce(out)
        return out


class _GatherVocab:
    """A rank's logits [N, rows] -> the whole vocabulary's [N, vocab_size]."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        return all_gather_columns(local)[:, :self.vocab_size]


def shard_vocab(model: CausalLM, vocab_size: int, rank: int, size: int) -> None:
    """Keep this rank's slice of the embedding and LM head rows (after loading; the model's
    `tensor_parallel_plan` marks them "vocab"; a tied pair stays tied). The vocabulary is
    padded to a multiple of `size` with zero rows, whose logits are dropped when gathered."""
    plan: dict[str, str] = getattr(model, "tensor_parallel_plan", {})
    rows = -(-vocab_size // size)
    start, stop = rank * rows, min((rank + 1) * rows, vocab_size)
    sliced: dict[int, nn.Parameter] = {}

    def local(weight: torch.Tensor) -> nn.Parameter:
        if id(weight) not in sliced:
            part = weight.new_zeros(rows, *weight.shape[1:])
            part[:max(0, stop - start)] = weight[start:stop]
            sliced[id(weight)] = nn.Parameter(part, requires_grad=False)
        return sliced[id(weight)]

    for name, module in list(model.named_modules()):
        if plan.get(name.rsplit(".", 1)[-1]) != "vocab":
            continue
        if isinstance(module, nn.Embedding):
            model.set_submodule(name, VocabParallelEmbedding(local(module.weight), start))
        else:
            assert isinstance(module, Linear) and module.bias is None, name
            module.weight = local(module.weight)
            module.out_features = rows
    model.gather_logits = _GatherVocab(vocab_size)


def rendezvous_store(size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free localhost port, bound here (so no other process
    can take the port between choosing and binding it); the ranks join at `store.port`."""
    return dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=_COLLECTIVE_TIMEOUT,
                         wait_for_workers=False)


def init_process_group(rank: int, size: int, store: dist.TCPStore | int,
                       device: torch.device) -> None:
    """Join the group of `size` ranks (NCCL on CUDA, gloo on CPU): rank 0 with its store,
    the others with its port."""
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel group already exists in this process: one "
                           "tensor-parallel engine per process")
    if isinstance(store, int):
        store = dist.TCPStore("127.0.0.1", store, size, is_master=False,
                              timeout=_COLLECTIVE_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=_COLLECTIVE_TIMEOUT)
