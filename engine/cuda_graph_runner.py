"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of an 8B Llama launches ~400 kernels (32 layers × ~12). At small batch sizes an
H100 finishes each one faster than Python can launch the next, so eager decode is bound by the
launch rate, not by the weights it streams. Captured once at start-up, a graph replays the whole
forward and the lm_head in one launch.

Everything a replay reads lives in static buffers sized for the largest bucket; `run` copies
the step into them with one host-to-device transfer. Padded rows get slot -1 (nothing is
written to the cache) and a context of one key in block 0 (zero-initialised, or some
sequence's finite KV), so their rows stay finite; they are dropped. The attention backend
fixes its launch configuration (the flash-decoding split count) per bucket at capture; the
split bounds are computed on the device from `seq_lens`, so a replay stays right for any
context up to `max_model_len`.

Off CUDA (`use_graphs=False`, tests under the Triton interpreter) the same static-buffer path
runs eagerly, so the padding and buffer logic is checked without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.models.registry import CausalLM

__all__ = ["CudaGraphRunner", "graph_buckets"]

# Columns of the staging buffer: one row per sequence.
_IDS, _POS, _SLOT, _LEN = range(4)


def graph_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8 (vLLM's
    choice: at most 7 padded rows of waste, ~20 graphs for 128)."""
    if max_batch <= 0:
        return []
    buckets = [b for b in (1, 2, 4) if b < max_batch]
    buckets += list(range(8, max_batch + 1, 8))
    if not buckets or buckets[-1] < max_batch:
        buckets.append(max_batch)
    return buckets


class CudaGraphRunner:
    def __init__(self, model: CausalLM, *, max_batch: int, max_blocks_per_seq: int,
                 max_seq_len: int, device: torch.device, use_graphs: bool,
                 launch_config: Callable[[int], AbstractContextManager[None]] | None = None):
        """`launch_config(num_seqs)`, when given, is entered as a context manager around the
        warm-up and capture of each bucket (the backend fixes its split count in it)."""
        self.model = model
        self.device = device
        self.use_graphs = use_graphs
        self.max_seq_len = max_seq_len
        self.launch_config = launch_config
        if max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {max_batch}")
        self.buckets = graph_buckets(max_batch)
        num_rows = self.buckets[-1]
        # Static inputs every replay reads (views of these are baked into the graphs).
        self.step_ints = torch.zeros(4, num_rows, dtype=torch.int64, device=device)  # [4, B]
        self.block_tables = torch.zeros(num_rows, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)  # [B, max_blocks]
        self.query_start_loc = torch.arange(num_rows + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(num_rows, dtype=torch.int32, device=device)  # [B]
        pin = device.type == "cuda"
        # Two sets of pinned staging buffers, used in turn: with asynchronous decode the host
        # fills step N+1's inputs while step N's upload may still be queued on the device.
        self._stagings = [torch.zeros(4, num_rows, dtype=torch.int64, pin_memory=pin)
                          for _ in range(2)]
        self._staging_tables_pair = [
            torch.zeros(num_rows, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
            for _ in range(2)]
        self._turn = 0
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self._pool: Any = None  # the graphs' shared memory pool (an opaque handle)

    # ---- capture ---------------------------------------------------------------------------
    def capture_all(self) -> None:
        """Capture every bucket, largest first (later, smaller graphs reuse its memory pool)."""
        self._write_padding(self.buckets[-1], 0)
        self._upload(self.buckets[-1])
        for num_rows in reversed(self.buckets):
            self._replays[num_rows] = self._capture(num_rows)

    def _launch_config(self, num_rows: int) -> AbstractContextManager[None]:
        return self.launch_config(num_rows) if self.launch_config else nullcontext()

    def _capture(self, num_rows: int) -> Callable[[], torch.Tensor]:
        if not self.use_graphs:
            def eager() -> torch.Tensor:  # the launch configuration a graph would have baked in
                with self._launch_config(num_rows):
                    return self._forward(num_rows)
            return eager
        with self._launch_config(num_rows):
            for _ in range(2):  # compiles the Triton kernels of this shape outside the capture
                self._forward(num_rows)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(num_rows)  # [num_rows, vocab]: static output
            self._pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits
        return replay

    def _forward(self, num_rows: int) -> torch.Tensor:
        ints = self.step_ints[:, :num_rows]
        meta = AttentionMetadata(
            slot_mapping=ints[_SLOT],
            block_tables=self.block_tables[:num_rows],
            query_start_loc=self.query_start_loc[: num_rows + 1],
            seq_lens=self.seq_lens[:num_rows],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            is_decode_only=True,
        )
        hidden = self.model(ints[_IDS], ints[_POS], meta)  # [num_rows, hidden]
        return self.model.compute_logits(hidden)  # [num_rows, vocab]

    # ---- one step ----------------------------------------------------------------------------
    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest captured batch size that holds `num_seqs` rows (None: run eagerly)."""
        return next((b for b in self.buckets if b >= num_seqs and b in self._replays), None)

    @property
    def _staging(self) -> torch.Tensor:
        return self._stagings[self._turn]

    @property
    def _staging_tables(self) -> torch.Tensor:
        return self._staging_tables_pair[self._turn]

    def run(self, token_ids: Sequence[int] | torch.Tensor, positions: Sequence[int],
            slots: Sequence[int], block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [n, vocab] for n decode rows (row i: token at `positions[i]` of sequence i).

        `token_ids` may be a device tensor [n] (the previous step's samples, never read back
        to the host): it is copied on the device, after the upload of everything else."""
        num_seqs = len(positions)
        num_rows = self.bucket_for(num_seqs)
        if num_rows is None:
            raise ValueError(f"no graph holds {num_seqs} sequences (largest {self.buckets[-1]})")
        self._turn ^= 1
        staging, tables = self._staging, self._staging_tables
        if not isinstance(token_ids, torch.Tensor):
            staging[_IDS, :num_seqs] = torch.as_tensor(token_ids, dtype=torch.int64)
        staging[_POS, :num_seqs] = torch.as_tensor(positions, dtype=torch.int64)
        staging[_SLOT, :num_seqs] = torch.as_tensor(slots, dtype=torch.int64)
        staging[_LEN, :num_seqs] = staging[_POS, :num_seqs] + 1
        width = max(len(t) for t in block_tables)
        tables[:num_seqs, :width] = torch.tensor(
            [list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        tables[:num_seqs, width:] = 0
        self._write_padding(num_rows, num_seqs)
        self._upload(num_rows)
        if isinstance(token_ids, torch.Tensor):
            self.step_ints[_IDS, :num_seqs].copy_(token_ids)
        return self._replays[num_rows]()[:num_seqs]

    def _write_padding(self, num_rows: int, num_seqs: int) -> None:
        """Rows num_seqs..num_rows: token 0 at position 0, no cache write, one key in block 0."""
        self._staging[:, num_seqs:num_rows] = 0
        self._staging[_SLOT, num_seqs:num_rows] = -1
        self._staging[_LEN, num_seqs:num_rows] = 1
        self._staging_tables[num_seqs:num_rows].zero_()

    def _upload(self, num_rows: int) -> None:
        # Whole, contiguous pinned buffers (4 x B int64 is a few KB): a non-contiguous slice
        # would be staged through pageable memory, whose copy waits for the stream to drain.
        # This buffer's previous upload (two steps ago) finished before its outputs were read.
        self.step_ints.copy_(self._staging, non_blocking=True)
        self.seq_lens[:num_rows].copy_(self.step_ints[_LEN, :num_rows])
        self.block_tables[:num_rows].copy_(self._staging_tables[:num_rows], non_blocking=True)
