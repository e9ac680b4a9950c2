"""StepInputs: what rank 0 sends the other tensor-parallel ranks rebuilds the same step."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.scheduler import ScheduledBatch
from tokenfleet.engine.sequence import Sequence
from tokenfleet.engine.step_inputs import StepInputs


def _batch() -> ScheduledBatch:
    prefill = Sequence(request_id="a", prompt_token_ids=list(range(10, 30)),
                       params=SamplingParams(), seed=0)
    prefill.block_table = [7, 3]
    prefill.num_computed_tokens = 16  # a chunk that starts in the second block, mid-prompt
    decode = Sequence(request_id="b", prompt_token_ids=[5, 6, 7], params=SamplingParams(),
                      seed=0)
    decode.output_token_ids = [8]
    decode.block_table = [4]
    decode.num_computed_tokens = 3
    return ScheduledBatch([prefill, decode], [4, 1])


def test_a_batch_becomes_flat_rows_slots_and_tables() -> None:
    inputs, sampled = StepInputs.from_batch(_batch(), block_size=16)
    assert inputs.token_ids == [26, 27, 28, 29, 8]
    assert inputs.positions == [16, 17, 18, 19, 3]
    assert inputs.slots == [3 * 16 + 0, 3 * 16 + 1, 3 * 16 + 2, 3 * 16 + 3, 4 * 16 + 3]
    assert inputs.query_start_loc == [0, 4, 5]
    assert inputs.seq_lens == [20, 4]
    assert inputs.block_tables == [[7, 3], [4, 0]]
    assert inputs.sample_rows == [3, 4] and [s.request_id for s in sampled] == ["a", "b"]
    assert not inputs.is_decode_only


def test_pack_and_unpack_rebuild_the_same_device_inputs() -> None:
    inputs, _ = StepInputs.from_batch(_batch(), block_size=16)
    again = StepInputs.unpack(inputs.pack())
    assert again.sample_rows == []  # rank 0's business only
    for a, b in zip(inputs.to_device(torch.device("cpu")),
                    again.to_device(torch.device("cpu")), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    meta_a, meta_b = inputs.to_device(torch.device("cpu"))[2], again.to_device(
        torch.device("cpu"))[2]
    for name in ("slot_mapping", "block_tables", "query_start_loc", "seq_lens"):
        assert torch.equal(getattr(meta_a, name), getattr(meta_b, name)), name
    assert (meta_a.max_query_len, meta_a.max_seq_len, meta_a.is_decode_only) == \
        (meta_b.max_query_len, meta_b.max_seq_len, meta_b.is_decode_only)
    with pytest.raises(ValueError, match="malformed"):
        StepInputs.unpack(inputs.pack()[:-8])
