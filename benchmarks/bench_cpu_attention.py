"""CPU decode attention: the C kernel (kernels/cpu_paged_decode.c) vs the torch path it replaces.

    python benchmarks/bench_cpu_attention.py [--batches 1,8,32] [--contexts 256,1024,4096]
        [--shapes smollm2,llama3-8b] [--layers 30] [--against OLD.c] [--prompts 512,2048]

Times one decode step's attention over `--layers` layers, each with its own paged cache, so
the K/V reads come from memory as they do in the engine rather than from a warm L2 (fewer
layers where their caches would pass `--cache-gib`; at least 2). Both
sides get the same step: blocks scattered over the cache, bf16, the backend's per-step plan
built once per step (as the engine does) and shared by the layers. Prints µs per layer call
and the ratio torch / kernel. `--against OLD.c` compares the kernel with another build of
its source instead of torch (e.g. `git show REV:kernels/cpu_paged_decode.c > /tmp/old.c`),
alternating the two over `--ab-rounds` rounds and printing medians. `--prompts` adds prefill
steps: one sequence's prompt of that many tokens in one chunk (batch column "prompt"; 0 rows of
decode cases with `--batches ""`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.layers.attention_torch import TorchAttentionBackend
from tokenfleet.kernels import cpu_build, cpu_paged_decode
from tokenfleet.kernels.cpu_paged_decode import CpuPagedDecode

SHAPES = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # heads, kv heads, head_dim
BLOCK_SIZE = 16


def _step(num_seqs: int, context: int, num_kv_heads: int, head_dim: int, num_layers: int,
          seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], AttentionMetadata]:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq + 8
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * blocks_per_seq]
    tables = tables.view(num_seqs, blocks_per_seq).to(torch.int32)
    lens = [context - (i % 8) for i in range(num_seqs)]  # slightly ragged, like real traffic
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    caches = [(torch.randn(shape, generator=gen).bfloat16(),
               torch.randn(shape, generator=gen).bfloat16()) for _ in range(num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_seqs,), -1, dtype=torch.int64), block_tables=tables,
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), max_query_len=1,
        max_seq_len=max(lens), is_decode_only=True,
        query_start_loc_cpu=list(range(num_seqs + 1)), seq_lens_cpu=lens)
    return caches, meta


def _time_step(backend: TorchAttentionBackend, caches: list[tuple[torch.Tensor, torch.Tensor]],
               meta: AttentionMetadata, q: torch.Tensor, kv: torch.Tensor,
               rounds: int) -> float:
    """Seconds per layer call, the plan rebuilt every step as in the engine."""
    def one_step() -> None:
        meta.backend_plan = None
        for k_cache, v_cache in caches:
            backend.forward(q, kv, kv, k_cache, v_cache, meta, q.shape[2] ** -0.5, None)

    one_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        one_step()
    return (time.perf_counter() - t0) / (rounds * len(caches))


def _prompt_step(prompt_len: int, num_kv_heads: int, head_dim: int, num_layers: int,
                 seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], AttentionMetadata]:
    """One sequence's whole prompt as one chunk: row i sees keys 0..i."""
    caches, meta = _step(1, prompt_len, num_kv_heads, head_dim, num_layers, seed)
    lens = [prompt_len]
    meta = AttentionMetadata(
        slot_mapping=torch.full((prompt_len,), -1, dtype=torch.int64),
        block_tables=meta.block_tables,
        query_start_loc=torch.tensor([0, prompt_len], dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), max_query_len=prompt_len,
        max_seq_len=prompt_len, is_decode_only=False,
        query_start_loc_cpu=[0, prompt_len], seq_lens_cpu=lens)
    return caches, meta


def _cases(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(shape, rows, keys): decode steps of `rows` sequences, or one prompt (rows = -1)."""
    cases = []
    for name in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",") if b):
            cases += [(name, batch, int(c)) for c in args.contexts.split(",")]
        cases += [(name, -1, int(n)) for n in args.prompts.split(",") if n]
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--shapes", default="smollm2,llama3-8b")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache-gib", type=float, default=3.0)
    ap.add_argument("--against", type=Path, help="another kernel source to compare with")
    ap.add_argument("--ab-rounds", type=int, default=5)
    ap.add_argument("--prompts", default="", help="prompt lengths of prefill cases")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as build_dir:
        kernel = cpu_paged_decode.load(Path(build_dir))
        other = None if args.against is None else cpu_build.load(
            args.against, Path(build_dir), cpu_paged_decode._COMPILE_FLAGS, CpuPagedDecode, {})
        if kernel is None or (args.against is not None and other is None):
            raise SystemExit("no C compiler here (or the other source does not build)")
        baseline = "torch" if other is None else "other"
        print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, bf16, {args.layers} layers with their own caches; µs per layer call")
        print(f"{'shape':>10} {'batch':>6} {'context':>7} {baseline:>9} {'kernel':>9} "
              f"{'ratio':>7}")
        for name, batch, context in _cases(args):
            num_heads, num_kv_heads, head_dim = SHAPES[name]
            rows = context if batch < 0 else batch
            layer_bytes = 2 * max(batch, 1) * context * num_kv_heads * head_dim * 2
            num_layers = max(2, min(args.layers, int(args.cache_gib * 2**30 // layer_bytes)))
            caches, meta = (_prompt_step(context, num_kv_heads, head_dim, num_layers, 1)
                            if batch < 0 else
                            _step(batch, context, num_kv_heads, head_dim, num_layers, 1))
            q = torch.randn(rows, num_heads, head_dim).bfloat16()
            kv = torch.zeros(rows, num_kv_heads, head_dim).bfloat16()
            backends = (TorchAttentionBackend(decode_kernel=other),
                        TorchAttentionBackend(decode_kernel=kernel))
            times: tuple[list[float], list[float]] = ([], [])
            for _ in range(1 if other is None else args.ab_rounds):
                for i, backend in enumerate(backends):
                    times[i].append(_time_step(backend, caches, meta, q, kv, args.rounds))
            theirs, ours = (statistics.median(t) for t in times)
            label = "prompt" if batch < 0 else str(batch)
            print(f"{name:>10} {label:>6} {context:7d} {theirs * 1e6:9.1f} "
                  f"{ours * 1e6:9.1f} {theirs / ours:6.2f}x", flush=True)

if __name__ == "__main__":
    main()
