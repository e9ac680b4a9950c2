"""One step's model inputs as host lists: built from a scheduled batch, sent to the other
tensor-parallel ranks as bytes, turned into device tensors on every rank the same way.

Splitting "what the step is" (lists) from "where it runs" (tensors) lets every rank of a
tensor-parallel group build bit-identical inputs from one description, without pickle.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.scheduler import ScheduledBatch
from tokenfleet.engine.sequence import Sequence

__all__ = ["StepInputs"]

_HEADER = 6  # num_tokens, num_seqs, max_blocks, max_query_len, is_decode_only, num_logit_rows


@dataclass(slots=True)
class StepInputs:
    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slots: list[int]  # [T] flat KV slot of each new token
    query_start_loc: list[int]  # [S + 1]
    seq_lens: list[int]  # [S] context length incl. this step's tokens
    block_tables: list[list[int]]  # [S][max_blocks], padded with 0
    max_query_len: int
    sample_rows: list[int]  # rows whose logits are sampled (rank 0 only; not sent)
    # Rows whose logits the step computes (prompt log-prob rows, then sample_rows): every
    # rank takes part when the LM head is split across tensor-parallel ranks.
    logit_rows: list[int] = field(default_factory=list)

    @classmethod
    def from_batch(cls, batch: ScheduledBatch, block_size: int
                   ) -> tuple[StepInputs, list[Sequence]]:
        """The step's inputs, and the sequences that sample a token (in sample_rows order).

        A sequence verifying draft tokens (speculative decoding) runs its last token and the
        drafts, and samples at each of them: it is listed once per row, consecutively."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            num_drafts = len(seq.draft_token_ids)
            if n == 1 + num_drafts and end - num_drafts == seq.num_tokens:
                # decode (avoid copying the whole history), with any drafts after it
                ids.append(seq.last_token_id)
                ids.extend(seq.draft_token_ids)
            else:
                assert not num_drafts, "drafts are scheduled only with their decode"
                ids.extend(seq.token_ids[start:end])
            pos.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            if end - num_drafts == seq.num_tokens:
                sample_rows.extend(range(qsl[-1] - 1 - num_drafts, qsl[-1]))
                sampled.extend([seq] * (1 + num_drafts))
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        inputs = cls(ids, pos, slots, qsl, seq_lens, tables, max(batch.num_new_tokens),
                     sample_rows)
        return inputs, sampled

    @classmethod
    def for_decode(cls, token_ids: list[int], positions: list[int], slots: list[int],
                   block_tables: list[list[int]]) -> StepInputs:
        """A decode step of one row per sequence (the static-buffer / CUDA-graph path)."""
        width = max(len(t) for t in block_tables)
        return cls(token_ids, positions, slots, list(range(len(positions) + 1)),
                   [p + 1 for p in positions], [t + [0] * (width - len(t)) for t in block_tables],
                   1, [])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    def to_device(self, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids [T] int64, positions [T] int64, metadata) on `device`."""
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(self.slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(self.block_tables, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(self.query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
            max_query_len=self.max_query_len,
            max_seq_len=max(self.seq_lens),
            is_decode_only=self.is_decode_only,
            query_start_loc_cpu=self.query_start_loc,
            seq_lens_cpu=self.seq_lens,
        )
        return (torch.tensor(self.token_ids, dtype=torch.int64, device=device),
                torch.tensor(self.positions, dtype=torch.int64, device=device), meta)

    def pack(self) -> bytes:
        """Everything but sample_rows, as int64s (what the other ranks need to run the step)."""
        num_seqs = len(self.seq_lens)
        max_blocks = len(self.block_tables[0]) if self.block_tables else 0
        data = array("q", (len(self.token_ids), num_seqs, max_blocks, self.max_query_len,
                           int(self.is_decode_only), len(self.logit_rows)))
        for part in (self.token_ids, self.positions, self.slots, self.query_start_loc,
                     self.seq_lens, self.logit_rows):
            data.extend(part)
        for row in self.block_tables:
            data.extend(row)
        return data.tobytes()

    @classmethod
    def unpack(cls, payload: bytes) -> StepInputs:
        data = array("q")
        data.frombytes(payload)
        num_tokens, num_seqs, max_blocks, max_query_len, _, num_logit_rows = data[:_HEADER]
        values = data[_HEADER:].tolist()
        sizes = [num_tokens] * 3 + [num_seqs + 1, num_seqs, num_logit_rows]
        parts: list[list[int]] = []
        offset = 0
        for size in sizes:
            parts.append(values[offset:offset + size])
            offset += size
        tables = [values[offset + i * max_blocks: offset + (i + 1) * max_blocks]
                  for i in range(num_seqs)]
        if offset + num_seqs * max_blocks != len(values):
            raise ValueError("malformed step inputs: length does not match the header")
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4], tables, max_query_len, [],
                   parts[5])
