"""The C decode-attention kernel (kernels/cpu_paged_decode.c) vs the torch reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.layers.attention_torch import TorchAttentionBackend
from tokenfleet.kernels import cpu_build, cpu_paged_decode
from tokenfleet.kernels.cpu_paged_decode import CpuPagedDecode
from tokenfleet.kernels.paged_batch import PagedBatch, make_paged_batch
from tokenfleet.kernels.reference import paged_attention_ref, store_kv_ref
from tokenfleet.kernels.selfcheck import rel_err

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the engine keeps the torch path")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> CpuPagedDecode:
    k = cpu_paged_decode.load(tmp_path_factory.mktemp("kernels"))
    assert k is not None, "a C compiler is present, so the kernel must build"
    return k


def _meta(b: PagedBatch) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=b.slot_mapping, block_tables=b.block_tables,
        query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
        max_query_len=b.max_query_len, max_seq_len=b.max_seq_len,
        is_decode_only=b.is_decode_only,
        query_start_loc_cpu=b.query_start_loc.tolist(), seq_lens_cpu=b.seq_lens.tolist())


def _decode_batch(contexts: tuple[int, ...], num_heads: int, num_kv_heads: int, head_dim: int,
                  block_size: int, dtype: torch.dtype, seed: int) -> PagedBatch:
    b = make_paged_batch(context_lens=contexts, query_lens=(1,) * len(contexts),
                         num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         block_size=block_size, dtype=dtype, device="cpu", seed=seed)
    store_kv_ref(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)  # the step's own key too
    return b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    ("heads", "head_dim", "window"),
    [((9, 3), 64, None),  # SmolLM2's shape: GQA 3, the AVX-512 bf16 path where present
     ((8, 2), 128, None),  # GQA 4, Llama-3's head_dim
     ((6, 6), 96, 7),  # no GQA, a head_dim multiple of 32 but not 64/128, sliding window
     ((4, 1), 40, None)],  # GQA 4, a head_dim for the portable loop only
    ids=["gqa3-d64", "gqa4-d128", "mha-d96-window", "gqa4-d40"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_matches_reference(kernel: CpuPagedDecode, dtype: torch.dtype,
                           heads: tuple[int, int], head_dim: int, window: int | None,
                           num_threads: int) -> None:
    # Contexts from 1 key to many blocks; make_paged_batch scatters blocks over the cache.
    b = _decode_batch((0, 3, 15, 16, 61, 200), *heads, head_dim=head_dim, block_size=16,
                      dtype=dtype, seed=11)
    scale = head_dim ** -0.5
    expected = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables,
                                   b.query_start_loc, b.seq_lens, scale, window)
    out = kernel(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, scale, window,
                 num_threads)
    assert out.shape == b.q.shape and out.dtype == dtype
    assert rel_err(out, expected) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_backend_mixed_step_matches_sdpa_path(kernel: CpuPagedDecode) -> None:
    """A step with prefill chunks and decodes: the kernel takes the decode rows, SDPA the
    rest, and the result equals the backend without the kernel (same caches written)."""
    b = make_paged_batch(context_lens=(0, 10, 37, 5, 90), query_lens=(12, 6, 1, 1, 1),
                         num_heads=8, num_kv_heads=2, head_dim=64, block_size=4,
                         dtype=torch.float32, device="cpu", seed=5)
    caches = (b.k_cache.clone(), b.v_cache.clone())
    with_kernel = TorchAttentionBackend(decode_kernel=kernel).forward(
        b.q, b.k, b.v, b.k_cache, b.v_cache, _meta(b), 0.125, 24)
    without = TorchAttentionBackend().forward(b.q, b.k, b.v, *caches, _meta(b), 0.125, 24)
    assert torch.equal(b.k_cache, caches[0]) and torch.equal(b.v_cache, caches[1])
    torch.testing.assert_close(with_kernel, without, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("heads", "window"), [((9, 3, 64), None), ((9, 3, 64), 6),
                                               ((8, 2, 128), None)],
                         ids=["smollm2", "smollm2-window-6", "gqa4-d128"])
def test_prefill_rows_in_the_kernel_match_reference(kernel: CpuPagedDecode, dtype: torch.dtype,
                                                    heads: tuple[int, int, int],
                                                    window: int | None) -> None:
    """Every row of a step with fresh prompts, chunks that start mid-block after a cached
    prefix, and decodes goes to the kernel, each prefill row causal at its own position."""
    num_heads, num_kv_heads, head_dim = heads
    b = make_paged_batch(context_lens=(0, 10, 0, 37, 5), query_lens=(12, 6, 1, 1, 33),
                         num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         block_size=4, dtype=dtype, device="cpu", seed=17)
    scale = head_dim ** -0.5
    meta = _meta(b)
    backend = TorchAttentionBackend(decode_kernel=kernel)
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, meta, scale, window)
    plan = meta.backend_plan
    assert plan.kernel is not None
    if dtype == torch.bfloat16 and kernel.fast_bf16:  # every row in the kernel
        assert plan.kernel.q_idx is None and not plan.prefills
        assert plan.kernel.seq_lens.tolist() == [*range(1, 13), *range(11, 17), 1, 38,
                                                 *range(6, 39)]
    else:  # the portable loop is slower than SDPA on prompts: only the decodes
        assert plan.kernel.q_idx.tolist() == [18, 19] and len(plan.prefills) == 3
    expected = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables,
                                   b.query_start_loc, b.seq_lens, scale, window)
    assert rel_err(out, expected) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_a_long_prompt_goes_to_sdpa_and_the_decodes_stay_in_the_kernel(
        kernel: CpuPagedDecode, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenfleet.engine.layers import attention_torch

    monkeypatch.setattr(attention_torch, "KERNEL_MAX_PREFILL_CONTEXT", 20)
    b = make_paged_batch(context_lens=(0, 30, 3, 12), query_lens=(8, 1, 1, 9), num_heads=9,
                         num_kv_heads=3, head_dim=64, block_size=4, dtype=torch.bfloat16,
                         device="cpu", seed=19)
    meta = _meta(b)
    out = TorchAttentionBackend(decode_kernel=kernel).forward(
        b.q, b.k, b.v, b.k_cache, b.v_cache, meta, 0.125, None)
    plan = meta.backend_plan
    assert plan.kernel is not None and plan.kernel.q_idx.tolist() == [8, 9]  # the decodes
    assert [(p.start, p.end) for p in plan.prefills] == [(0, 8), (10, 19)]  # 21 keys: SDPA
    expected = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables,
                                   b.query_start_loc, b.seq_lens, 0.125, None)
    assert rel_err(out, expected) < 1e-2


def test_compiled_call_matches_eager(kernel: CpuPagedDecode) -> None:
    """Under torch.compile the kernel is an opaque custom op (no graph break)."""
    b = _decode_batch((5, 33), 8, 2, 64, 16, torch.bfloat16, seed=3)

    def attend(q: torch.Tensor) -> torch.Tensor:
        out = torch.ops.tokenfleet.cpu_paged_decode(str(kernel.library), q * 2, b.k_cache,
                                                    b.v_cache, b.block_tables, b.seq_lens,
                                                    0.125, 0, 2)
        return out + 1

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    expected = kernel(b.q * 2, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.125, None,
                      2) + 1
    assert torch.equal(compiled(b.q), expected)


def test_bad_arguments_raise_value_error(kernel: CpuPagedDecode) -> None:
    b = _decode_batch((5, 33), 8, 2, 64, 16, torch.float32, seed=4)
    args = (b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.125, None, 1)
    with pytest.raises(ValueError, match="bf16/float32"):
        kernel(b.q.half(), *args)
    with pytest.raises(ValueError, match="does not match the cache"):
        kernel(b.q[:, :, :32], *args)
    with pytest.raises(ValueError, match="int32"):
        kernel(b.q, b.k_cache, b.v_cache, b.block_tables.long(), b.seq_lens, 0.125, None, 1)
    too_long = b.seq_lens.clone()
    too_long[0] = b.block_tables.shape[1] * 16 + 1
    with pytest.raises(ValueError, match="longer than its block table"):
        kernel(b.q, b.k_cache, b.v_cache, b.block_tables, too_long, 0.125, None, 1)
    bad_block = b.block_tables.clone()
    bad_block[0, 0] = b.k_cache.shape[0]
    with pytest.raises(ValueError, match="block ids"):
        kernel(b.q, b.k_cache, b.v_cache, bad_block, b.seq_lens, 0.125, None, 1)
    zero = b.seq_lens.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match="out of range"):
        kernel(b.q, b.k_cache, b.v_cache, b.block_tables, zero, 0.125, None, 1)
    # rows sharing block table rows: checked like the tables (the C code trusts them)
    both_first = torch.zeros(2, dtype=torch.int32)
    same = kernel(b.q, b.k_cache, b.v_cache, b.block_tables[:1].contiguous(),
                  torch.full((2,), 5, dtype=torch.int32), 0.125, None, 1, row_seqs=both_first)
    for r in range(2):  # each row alone, with table row 0
        alone = kernel(b.q[r:r + 1], *args[:2], b.block_tables[:1].contiguous(),
                       torch.tensor([5], dtype=torch.int32), 0.125, None, 1)
        assert torch.equal(same[r], alone[0])
    with pytest.raises(ValueError, match="row_seqs must be in"):
        kernel(b.q, *args[:3], b.seq_lens, 0.125, None, 1,
               row_seqs=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous int32"):
        kernel(b.q, *args[:3], b.seq_lens, 0.125, None, 1, row_seqs=torch.tensor([0, 1]))


def test_build_is_cached_and_survives_no_compiler(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = cpu_paged_decode.load(tmp_path)
    assert first is not None
    assert [p.name for p in tmp_path.iterdir()] == [first.library.name]  # no temp files left
    assert cpu_paged_decode.load(tmp_path) is first  # built once, loaded once per process
    monkeypatch.setattr(cpu_build.shutil, "which", lambda name: None)
    assert cpu_paged_decode.load(tmp_path / "elsewhere") is None


@pytest.mark.parametrize(("contexts", "window", "num_threads"), [
    ((1500,), None, 2),  # one sequence, its context split in two
    ((1100, 3), None, 4),  # two sequences over four threads: the short one has empty parts
    ((2000,), 700, 3),  # split inside a sliding window
], ids=["one-seq", "two-seqs-4-threads", "window"])
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)], ids=["smollm2", "gqa4-d128"])
def test_split_context_matches_reference(kernel: CpuPagedDecode, contexts: tuple[int, ...],
                                         window: int | None, num_threads: int,
                                         heads: tuple[int, int, int]) -> None:
    """Long contexts are split into parts by their length and the parts' softmax states merged
    (bf16 with AVX-512 BF16; elsewhere the unsplit loop runs): right on any thread count, and
    the same bits on every thread count."""
    num_heads, num_kv_heads, head_dim = heads
    b = _decode_batch(contexts, num_heads, num_kv_heads, head_dim, block_size=16,
                      dtype=torch.bfloat16, seed=21)
    scale = head_dim ** -0.5
    expected = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables,
                                   b.query_start_loc, b.seq_lens, scale, window)
    out = kernel(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, scale, window,
                 num_threads)
    one_thread = kernel(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, scale, window, 1)
    assert rel_err(out, expected) < 1e-2
    assert torch.equal(out, one_thread)


@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)], ids=["smollm2", "gqa4-d128"])
def test_a_decode_row_does_not_depend_on_its_batch(kernel: CpuPagedDecode,
                                                   heads: tuple[int, int, int]) -> None:
    """Batch invariance: a decode row's output is the same bits alone, among other decode rows,
    beside a prompt's rows, and on 1-3 threads (its parts depend on its length alone)."""
    num_heads, num_kv_heads, head_dim = heads
    b = _decode_batch((1500, 700, 40, 2100, 300), num_heads, num_kv_heads, head_dim,
                      block_size=16, dtype=torch.bfloat16, seed=5)
    scale = head_dim ** -0.5
    batch = kernel(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, scale, None, 2)
    for i in range(5):
        for threads in (1, 2, 3):
            alone = kernel(b.q[i:i + 1], b.k_cache, b.v_cache, b.block_tables[i:i + 1],
                           b.seq_lens[i:i + 1], scale, None, threads)
            assert torch.equal(alone[0], batch[i]), (i, threads)
    # Sequence 1's decode row after eight prompt rows of sequence 3 (rows of one sequence are
    # never split, so the call splits only the decode row).
    prompt_lens = torch.arange(2093, 2101, dtype=torch.int32)
    q = torch.cat([b.q[3:4].expand(8, -1, -1), b.q[1:2]]).contiguous()
    mixed = kernel(q, b.k_cache, b.v_cache, b.block_tables,
                   torch.cat([prompt_lens, b.seq_lens[1:2]]).contiguous(), scale, None, 2,
                   row_seqs=torch.tensor([3] * 8 + [1], dtype=torch.int32))
    assert torch.equal(mixed[8], batch[1])


@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)], ids=["smollm2", "gqa4-d128"])
def test_a_prompt_row_does_not_depend_on_its_chunk(kernel: CpuPagedDecode,
                                                   heads: tuple[int, int, int]) -> None:
    """A prompt row's output is the same bits in a long chunk, in a short one, alone (a
    one-token chunk, computed like a decode row) and on 1-3 threads: its keys are cut into
    parts by their number alone, a prompt row's parts computed one after another. Before
    2026-11-27 rows inside a chunk were never cut and lone rows were, and this test failed."""
    num_heads, num_kv_heads, head_dim = heads
    b = _decode_batch((2100,), num_heads, num_kv_heads, head_dim, block_size=16,
                      dtype=torch.bfloat16, seed=9)
    scale = head_dim ** -0.5
    # Rows of one prompt seeing 120 ... 2,100 keys (1 to 16 parts).
    seq_lens = torch.tensor([120, 255, 256, 300, 301, 700, 1500, 2099, 2100], dtype=torch.int32)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(2))
    q = q.bfloat16()
    rows = torch.zeros(len(seq_lens), dtype=torch.int32)
    chunk = kernel(q, b.k_cache, b.v_cache, b.block_tables, seq_lens, scale, None, 2,
                   row_seqs=rows)
    expected = paged_attention_ref(q, b.k_cache, b.v_cache, b.block_tables.expand(9, -1),
                                   torch.arange(10, dtype=torch.int32), seq_lens, scale)
    assert rel_err(chunk, expected) < 1e-2
    for threads in (1, 3):
        again = kernel(q, b.k_cache, b.v_cache, b.block_tables, seq_lens, scale, None, threads,
                       row_seqs=rows)
        assert torch.equal(again, chunk), threads
    for i in range(len(seq_lens)):
        alone = kernel(q[i:i + 1], b.k_cache, b.v_cache, b.block_tables, seq_lens[i:i + 1],
                       scale, None, 2)
        assert torch.equal(alone[0], chunk[i]), i
    short = kernel(q[3:5].contiguous(), b.k_cache, b.v_cache, b.block_tables, seq_lens[3:5],
                   scale, None, 2, row_seqs=rows[3:5])
    assert torch.equal(short, chunk[3:5])
