"""Sampler, SamplingBatch and the counter-based generator, checked against HF's processors."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tokenfleet.engine.sampler import Sampler, apply_penalties, warp
from tokenfleet.engine.sampling_batch import SamplingBatch
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.seeded_random import to_int64_seed, uniform
from tokenfleet.kernels import cpu_row_stats

VOCAB = 64


@pytest.fixture(params=["torch", "c"])
def sampler(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Sampler:
    """Both implementations of the row reductions: torch's ops and the C kernel."""
    if request.param == "torch":
        return Sampler()
    kernel = cpu_row_stats.load(tmp_path_factory.getbasetemp() / "kernels")
    if kernel is None:
        pytest.skip("no C compiler: the C row-stats kernel cannot be built")
    return Sampler(kernel)


def _logits(num_rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=gen) * scale  # [n, vocab]


def _batch(params: list[SamplingParams], **kwargs: object) -> SamplingBatch:
    n = len(params)
    defaults: dict[str, Any] = {
        "seeds": [1000 + r for r in range(n)],
        "indices": [0] * n,
        "token_histories": None,
        "prompt_lens": [0] * n,
        "vocab_size": VOCAB,
        "device": "cpu",
    }
    defaults.update(kwargs)
    return SamplingBatch.build(params, **defaults)


def _hf(processors: list[LogitsProcessor], input_ids: list[list[int]], logits: torch.Tensor
        ) -> torch.Tensor:
    """Apply HF processors in order to [n, vocab] logits."""
    ids = cast(torch.LongTensor, torch.tensor(input_ids, dtype=torch.long))
    return LogitsProcessorList(processors)(ids, cast(torch.FloatTensor, logits))


# ---- seeded_random ---------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix_reference(seed: int, index: int, col: int) -> float:
    """Pure-Python statement of the documented formula (pins it: resumes depend on it)."""

    def mix(x: int) -> int:
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _M64
        return x ^ (x >> 31)

    gamma = 0x9E3779B97F4A7C15
    key = mix((mix((seed + gamma) & _M64) + index * gamma) & _M64)
    bits = mix((key + (col + 1) * gamma) & _M64)
    signed = bits - (1 << 64) if bits >= 1 << 63 else bits
    return ((signed >> 41) + 2**22 + 0.5) / 2**23


def test_uniform_matches_the_documented_formula() -> None:
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    indices = [0, 5, 1, 2**40, 17]
    u = uniform(torch.tensor([to_int64_seed(s) for s in seeds]), torch.tensor(indices), 40)
    for r, (seed, index) in enumerate(zip(seeds, indices, strict=True)):
        expected = [_splitmix_reference(seed, index, c) for c in range(40)]
        assert u[r].tolist() == expected
    assert to_int64_seed(2**64 - 1) == -1 and to_int64_seed(5) == 5
    for bad in (2**64, -1):
        with pytest.raises(ValueError):
            to_int64_seed(bad)


def test_uniform_row_depends_only_on_seed_and_index() -> None:
    seeds = torch.tensor([7, 7, 8, 123456789, 7])
    indices = torch.tensor([0, 1, 0, 3, 0])
    full = uniform(seeds, indices, 300)
    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = uniform(seeds[perm], indices[perm], 300)
    assert torch.equal(shuffled, full[perm])
    assert torch.equal(uniform(seeds[3:4], indices[3:4], 300), full[3:4])
    assert torch.equal(full[0], full[4])  # same (seed, index) twice
    # Different seed or different index: unrelated rows.
    for a, b in [(0, 1), (0, 2), (1, 2), (2, 3)]:
        assert (full[a] != full[b]).float().mean() > 0.99
    # Fewer columns are a prefix of more columns.
    assert torch.equal(uniform(seeds, indices, 10), full[:, :10])


def test_uniform_is_strictly_inside_unit_interval_and_uniform() -> None:
    num_rows, num_cols, num_bins = 400, 500, 100
    u = uniform(torch.arange(num_rows), torch.arange(num_rows) * 3, num_cols)
    assert u.dtype == torch.float32
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    counts = torch.bincount((u * num_bins).long().flatten(), minlength=num_bins).double()
    expected = u.numel() / num_bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # df = 99: mean 99, sd 14; 200 is > 7 sd out (and the inputs are fixed, so no flakiness).
    assert chi2 < 200, chi2
    # Neighbouring columns and indices are uncorrelated.
    flat = u - 0.5
    assert abs(float((flat[:, :-1] * flat[:, 1:]).mean())) < 0.002
    assert abs(float((flat[:-1] * flat[1:]).mean())) < 0.002


# ---- warpers and penalties vs transformers -----------------------------------------------------

_WARPER_CASES: list[tuple[dict[str, Any], list[LogitsProcessor]]] = [
    ({"temperature": 0.7}, [TemperatureLogitsWarper(0.7)]),
    ({"do_sample": True, "top_k": 5}, [TopKLogitsWarper(5)]),
    ({"do_sample": True, "top_p": 0.8}, [TopPLogitsWarper(0.8)]),
    ({"do_sample": True, "typical_p": 0.5}, [TypicalLogitsWarper(0.5)]),
    ({"do_sample": True, "min_p": 0.1}, [MinPLogitsWarper(0.1)]),
    ({"temperature": 1.3, "top_k": 20, "top_p": 0.9, "typical_p": 0.95, "min_p": 0.05},
     [TemperatureLogitsWarper(1.3), TopKLogitsWarper(20), TopPLogitsWarper(0.9),
      TypicalLogitsWarper(0.95), MinPLogitsWarper(0.05)]),
]


def _assert_same_distribution(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(reference)), "different surviving tokens"
    assert torch.allclose(ours.softmax(-1), reference.softmax(-1), atol=1e-6, rtol=1e-5)
    finite = ~torch.isinf(reference)
    assert torch.allclose(ours[finite], reference[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "processors"), _WARPER_CASES)
def test_warpers_match_transformers(
    kwargs: dict[str, Any], processors: list[LogitsProcessor]
) -> None:
    # Flat, typical and peaked rows: the warpers cut at very different places.
    logits = torch.cat([_logits(16, seed=1, scale=scale) for scale in (0.5, 3.0, 10.0)])
    batch = _batch([SamplingParams(**kwargs) for _ in range(48)])
    assert batch.warping is not None
    ours = warp(logits, batch.warping)
    reference = _hf(processors, [[0]] * 48, logits)
    _assert_same_distribution(ours, reference)
    assert int((~torch.isinf(ours)).sum(-1).min()) >= 1


def test_heterogeneous_rows_each_match_their_own_reference() -> None:
    """Neutral values of unused warpers leave each row exactly as HF alone would."""
    cases = [*_WARPER_CASES, ({"do_sample": True}, [])]
    params = [SamplingParams(**kw) for kw, _ in cases]
    logits = _logits(len(params), seed=2)
    batch = _batch(params)
    assert batch.warping is not None
    ours = warp(logits, batch.warping)
    for row, (_, procs) in enumerate(cases):
        reference = _hf(procs, [[0]], logits[row : row + 1])
        _assert_same_distribution(ours[row : row + 1], reference)


def test_repetition_penalty_matches_transformers_over_prompt_and_generated() -> None:
    logits = _logits(3, seed=3)
    histories = [[1, 2, 3, 2, 40], [5, 6, 7], [0, 63]]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(),
              SamplingParams(repetition_penalty=0.8)]
    batch = _batch(params, token_histories=histories, prompt_lens=[3, 1, 1])
    assert batch.penalties is not None
    ours = apply_penalties(logits, batch.penalties)
    for row, penalty in [(0, 1.3), (2, 0.8)]:
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        reference = _hf([processor], [histories[row]], logits[row : row + 1])
        assert torch.allclose(ours[row : row + 1], reference)
    assert torch.equal(ours[1], logits[1])


def test_frequency_and_presence_penalties_count_generated_tokens_only() -> None:
    logits = _logits(2, seed=4)
    histories = [[9, 9, 4, 4, 4, 7], [1, 2]]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=1.5),
              SamplingParams(presence_penalty=-1.0)]
    batch = _batch(params, token_histories=histories, prompt_lens=[2, 1])
    assert batch.penalties is not None
    ours = apply_penalties(logits, batch.penalties)
    expected = logits.clone()
    expected[0, 4] -= 0.5 * 3 + 1.5  # generated 3 times
    expected[0, 7] -= 0.5 * 1 + 1.5
    expected[1, 2] -= -1.0  # token 9 and token 1 are prompt tokens: untouched
    assert torch.allclose(ours, expected)


def test_penalties_need_histories() -> None:
    with pytest.raises(ValueError, match="token_histories"):
        _batch([SamplingParams(repetition_penalty=1.2)])


# ---- Sampler end to end -------------------------------------------------------------------------


def test_greedy_fast_path_is_argmax_with_logprobs(sampler: Sampler) -> None:
    logits = _logits(5, seed=5).to(torch.bfloat16)
    batch = _batch([SamplingParams() for _ in range(5)])
    assert batch.is_greedy_fast_path
    out = sampler(logits, batch)
    expected = logits.float().log_softmax(-1)
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert torch.allclose(out.logprobs, expected.max(-1).values, atol=1e-6)
    assert out.top_ids is None and out.top_logprobs is None


def test_bf16_greedy_rows_skip_the_float_copy_with_identical_results(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = cpu_row_stats.load(tmp_path_factory.getbasetemp() / "kernels")
    if kernel is None:
        pytest.skip("no C compiler: the C row-stats kernel cannot be built")
    logits = _logits(7, vocab=4099, seed=9).to(torch.bfloat16)
    batch = _batch([SamplingParams() for _ in range(7)], vocab_size=4099)
    copied = Sampler(kernel)(logits, batch)  # float32 copy first
    calls: list[torch.dtype] = []
    monkeypatch.setattr(torch.Tensor, "float", lambda self: calls.append(self.dtype) or
                        self.to(torch.float32))
    direct = Sampler(kernel, reads_bf16=True)(logits, batch)
    assert calls == []  # no copy made
    assert torch.equal(direct.token_ids, copied.token_ids)
    assert torch.equal(direct.logprobs, copied.logprobs) and direct.logprobs.dtype == torch.float32
    mixed = _batch([SamplingParams()] * 6 + [SamplingParams(temperature=0.7, seed=1)],
                   vocab_size=4099)  # one sampled row: the copy again, greedy rows same
    out = Sampler(kernel, reads_bf16=True)(logits, mixed)
    assert calls == [torch.bfloat16]
    assert torch.equal(out.logprobs[:6], copied.logprobs[:6])


def test_temperature_zero_is_greedy_and_penalised_greedy_uses_penalised_logits(
        sampler: Sampler) -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 10] = 5.0
    logits[:, 11] = 4.9
    params = [SamplingParams(temperature=0.0, top_k=3), SamplingParams(repetition_penalty=2.0)]
    batch = _batch(params, token_histories=[[1], [10]], prompt_lens=[1, 1])
    assert batch.warping is None and not batch.is_greedy_fast_path
    out = sampler(logits, batch)
    assert out.token_ids.tolist() == [10, 11]  # row 1: 5.0 / 2 < 4.9
    penalised = logits[1].clone()
    penalised[10] = 2.5
    assert math.isclose(float(out.logprobs[1]), float(penalised.log_softmax(-1)[11]), rel_tol=1e-6)


def test_banned_tokens_are_never_chosen(sampler: Sampler) -> None:
    logits = _logits(4, seed=6)
    top = logits.argmax(-1)
    params = [SamplingParams(), SamplingParams(do_sample=True, top_k=1)] * 2
    banned = [{int(top[r])} for r in range(4)]
    out = sampler(logits, _batch(params, banned_token_ids=banned))
    second = logits.topk(2, dim=-1).indices[:, 1]
    assert torch.equal(out.token_ids, second)
    with pytest.raises(ValueError):
        _batch(params, banned_token_ids=[{VOCAB}, set(), set(), set()])


def test_top_n_tokens_are_ordered_and_are_logprobs_of_the_sampling_distribution(
        sampler: Sampler) -> None:
    logits = _logits(3, seed=7)
    params = [
        SamplingParams(top_n_tokens=3),
        SamplingParams(do_sample=True, top_k=2, top_n_tokens=4, seed=1),
        SamplingParams(temperature=0.5, top_n_tokens=1),
    ]
    out = sampler(logits, _batch(params))
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (3, 4)
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())
    greedy = logits[0].log_softmax(-1)
    assert torch.equal(out.top_ids[0], greedy.topk(4).indices)
    assert torch.allclose(out.top_logprobs[0], greedy.topk(4).values)
    # top_k=2: the two survivors are renormalised, the rest have logprob -inf.
    two = logits[1].topk(2)
    assert torch.equal(out.top_ids[1, :2], two.indices)
    assert torch.allclose(out.top_logprobs[1, :2], two.values.log_softmax(-1))
    assert bool(torch.isinf(out.top_logprobs[1, 2:]).all())
    assert int(out.token_ids[1]) in two.indices.tolist()
    cooled = (logits[2] / 0.5).log_softmax(-1)
    chosen = int(out.token_ids[2])
    assert math.isclose(float(out.logprobs[2]), float(cooled[chosen]), rel_tol=1e-5)
    assert math.isclose(float(out.top_logprobs[2, 0]), float(cooled.max()), rel_tol=1e-5)


def test_seeded_draw_is_independent_of_the_batch(sampler: Sampler) -> None:
    """A row alone == the same row inside a mixed batch of 8, at any position."""
    logits = _logits(8, seed=8, scale=1.0)
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, top_p=0.9, temperature=0.8),
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(do_sample=True),
        SamplingParams(do_sample=True, top_k=7, typical_p=0.9, top_n_tokens=2),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.05, frequency_penalty=0.3),
        SamplingParams(do_sample=True, top_k=40),
    ]
    histories = [[r, r + 1, 2 * r] for r in range(8)]
    seeds = [11, 22, 33, 44, 55, 2**64 - 3, 77, 88]
    indices = [0, 3, 5, 9, 1, 2, 100, 4]
    full = sampler(logits, _batch(params, seeds=seeds, indices=indices,
                                    token_histories=histories, prompt_lens=[2] * 8))
    for row in range(8):
        alone = sampler(logits[row : row + 1], _batch(
            [params[row]], seeds=[seeds[row]], indices=[indices[row]],
            token_histories=[histories[row]], prompt_lens=[2]))
        assert int(alone.token_ids[0]) == int(full.token_ids[row])
        assert float(alone.logprobs[0]) == float(full.logprobs[row])
    perm = [7, 3, 0, 5, 1, 6, 2, 4]
    shuffled = sampler(logits[perm], _batch(
        [params[r] for r in perm], seeds=[seeds[r] for r in perm],
        indices=[indices[r] for r in perm], token_histories=[histories[r] for r in perm],
        prompt_lens=[2] * 8))
    assert torch.equal(shuffled.token_ids, full.token_ids[perm])


def test_different_seeds_and_indices_give_different_samples(sampler: Sampler) -> None:
    logits = torch.zeros(200, VOCAB)  # uniform over the vocab
    params = [SamplingParams(do_sample=True)] * 200
    by_seed = sampler(logits, _batch(params, seeds=list(range(200)), indices=[0] * 200))
    by_index = sampler(logits, _batch(params, seeds=[5] * 200, indices=list(range(200))))
    for out in (by_seed, by_index):
        assert len(set(out.token_ids.tolist())) > 40  # 200 draws over 64 tokens: ~61 distinct
    again = sampler(logits, _batch(params, seeds=list(range(200)), indices=[0] * 200))
    assert torch.equal(again.token_ids, by_seed.token_ids)


@pytest.mark.parametrize(
    "kwargs",
    [{"do_sample": True}, {"temperature": 0.6, "top_k": 5}, {"top_p": 0.7, "temperature": 1.5}],
)
def test_empirical_frequencies_match_the_distribution(kwargs: dict[str, Any],
                                                      sampler: Sampler) -> None:
    num_draws, vocab = 20_000, 8
    row_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5]])
    params = [SamplingParams(**kwargs)] * num_draws
    batch = _batch(params, seeds=[9] * num_draws, indices=list(range(num_draws)),
                   prompt_lens=[0] * num_draws, vocab_size=vocab)
    assert batch.warping is not None
    probs = warp(row_logits, _batch(params[:1], vocab_size=vocab).warping).softmax(-1)[0]
    out = sampler(row_logits.expand(num_draws, vocab), batch)
    freq = torch.bincount(out.token_ids, minlength=vocab).double() / num_draws
    assert bool((freq[probs == 0] == 0).all())  # masked tokens are never drawn
    sd = (probs.double() * (1 - probs.double()) / num_draws).sqrt()
    assert bool(((freq - probs.double()).abs() <= 5 * sd + 1e-9).all()), (freq, probs)
    expected = num_draws * probs.double()
    kept = expected > 0
    chi2 = float(((freq[kept] * num_draws - expected[kept]) ** 2 / expected[kept]).sum())
    assert chi2 < 30, chi2  # df <= 7: p < 1e-4


def test_logits_shape_is_checked(sampler: Sampler) -> None:
    batch = _batch([SamplingParams()])
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, VOCAB), batch)
    with pytest.raises(ValueError):
        sampler(torch.zeros(1, VOCAB + 1), batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_equal_cpu_draws() -> None:
    seeds, indices = torch.tensor([0, -1, 2**62, 99]), torch.tensor([0, 1, 2**33, 7])
    on_device = uniform(seeds.cuda(), indices.cuda(), 5000).cpu()
    assert torch.equal(uniform(seeds, indices, 5000), on_device)
    logits = _logits(4, seed=9, scale=1.0)
    params = [SamplingParams(do_sample=True, top_p=0.95, top_n_tokens=2)] * 4
    on_cpu = Sampler()(logits, _batch(params))
    on_gpu = Sampler()(logits.cuda(), _batch(params, device="cuda"))
    assert torch.equal(on_cpu.token_ids, on_gpu.token_ids.cpu())
    assert torch.allclose(on_cpu.logprobs, on_gpu.logprobs.cpu(), atol=1e-5)


def test_each_device_gets_its_one_pass_row_stats() -> None:
    """CUDA: the Triton kernel; CPU: the C kernel unless switched off (then torch's ops)."""
    pytest.importorskip("triton")
    from tokenfleet.engine.config import EngineConfig
    from tokenfleet.engine.sampler import torch_row_stats
    from tokenfleet.kernels.cpu_row_stats import CpuRowStats
    from tokenfleet.kernels.row_stats import row_stats

    config = EngineConfig(model="unused")
    cuda = Sampler.for_device(torch.device("cuda"), config)
    assert cuda.row_stats is row_stats and cuda.reads_bf16
    off = Sampler.for_device(torch.device("cpu"),
                             EngineConfig(model="unused", cpu_sampler_kernel=False))
    assert off.row_stats is torch_row_stats and not off.reads_bf16
    cpu = Sampler.for_device(torch.device("cpu"), config)
    if isinstance(cpu.row_stats, CpuRowStats):  # built here (a C compiler is present)
        assert cpu.reads_bf16
    else:
        assert cpu.row_stats is torch_row_stats


def test_warm_up_runs_the_row_stats_for_each_dtype_it_will_see() -> None:
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def row_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((scores.dtype, tuple(scores.shape)))
        return scores.argmax(-1), scores.float().logsumexp(-1)

    Sampler(row_stats).warm_up(50, torch.bfloat16, torch.device("cpu"))
    assert seen == [(torch.bfloat16, (1, 50)), (torch.float32, (1, 50))]
    seen.clear()
    Sampler(row_stats).warm_up(50, torch.float32, torch.device("cpu"))
    assert seen == [(torch.float32, (1, 50))]
