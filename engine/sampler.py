"""Turn one step's logits into next tokens, each row with its own parameters.

Order (TGI's, with HF's semantics for each step):
  1. banned tokens and tokens outside the row's grammar → -inf (the engine bans EOS before
     `min_new_tokens`), then `logit_bias` added;
  2. repetition penalty over prompt + generated tokens (HF: positive logits divided by the
     penalty, negative ones multiplied);
  3. frequency and presence penalties over generated tokens (OpenAI: logit -= freq * count +
     presence * (count > 0));
  -- greedy rows stop here and take the argmax --
  4. temperature, top_k, top_p, typical_p, min_p (HF's warpers, `min_tokens_to_keep=1`);
  5. a draw by the Gumbel-max trick (equivalently, an exponential race) with noise from
     `seeded_random.uniform(seed, index)`: a row's token depends only on its seed, the token's
     index and its own logits — never on the rest of the batch, the device or earlier steps.

Logprobs are those of the distribution the token was chosen from: log_softmax of the warped
logits for sampled rows, of the penalised logits (temperature 1) for greedy rows; the top
tokens are the top entries of that same distribution. No Python loop over rows and no
device-to-host synchronisation happen here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenfleet.engine.config import EngineConfig
from tokenfleet.engine.sampling_batch import Penalties, SamplingBatch, Warping
from tokenfleet.engine.seeded_random import uniform

__all__ = ["RowStats", "Sampler", "SamplerOutput", "apply_penalties", "gumbel_noise",
           "torch_row_stats", "warp"]

_NEG_INF = float("-inf")

# scores [n, vocab] -> (argmax [n] int64, logsumexp [n] float32): the two reductions every
# step needs. On CPU the engine passes the C kernel (kernels/cpu_row_stats.c): ~5x faster
# than these two ops at 32 x 49,152 logits (benchmarks/bench_cpu_step_parts.py); on CUDA
# the Triton kernel (kernels/row_stats.py), one read of the logits.
RowStats = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def torch_row_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scores.argmax(dim=-1), scores.logsumexp(dim=-1)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [n] int64
    logprobs: torch.Tensor  # [n] float32, logprob of the chosen token
    top_ids: torch.Tensor | None  # [n, k] int64, k = batch.max_top_n, best first; None if k = 0
    top_logprobs: torch.Tensor | None  # [n, k] float32


class Sampler:
    """Stateless: `Sampler()(logits, batch)` picks one token per row. Every row's argmax and
    log-normaliser come from `row_stats`, so a row's logprob is bit-identical whatever else
    is in the batch."""

    def __init__(self, row_stats: RowStats = torch_row_stats, reads_bf16: bool = False):
        """`reads_bf16`: `row_stats` reduces bf16 rows exactly as their float32 copy (the C
        kernel does; torch's logsumexp on bf16 rounds to bf16). Then an all-greedy batch of
        bf16 logits skips the float32 copy (the engine's 32-row sampler 0.81-0.97 -> 0.74 ms
        a step), with results bit-identical to the copy's."""
        self.row_stats = row_stats
        self.reads_bf16 = reads_bf16

    @classmethod
    def for_device(cls, device: torch.device, config: EngineConfig) -> Sampler:
        """Row stats in one read of the logits: the Triton kernel on CUDA (~6 torch kernels
        otherwise, ~0.3 ms of an H100 step at 128 rows), the C kernel on CPU (unless
        `cpu_sampler_kernel` is off or it cannot be built here); else torch's ops."""
        if device.type == "cuda":
            from tokenfleet.kernels.row_stats import row_stats  # triton: CUDA installs only

            return cls(row_stats, reads_bf16=True)
        if device.type == "cpu" and config.cpu_sampler_kernel:
            from tokenfleet.kernels import cpu_row_stats

            kernel = cpu_row_stats.load(config.kernel_dir)
            if kernel is not None:
                return cls(kernel, reads_bf16=True)
        return cls(torch_row_stats)

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Run the row stats once per dtype they will see (the logits', and float32 for
        penalised or sampled rows), so that a JIT kernel compiles before the first request."""
        for row_dtype in dict.fromkeys((dtype, torch.float32)):
            self.row_stats(torch.zeros(1, vocab_size, dtype=row_dtype, device=device))

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [num_rows, vocab] in any float dtype (computed in float32)."""
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {batch.num_rows} rows")
        if logits.shape[1] != batch.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, vocab is {batch.vocab_size}")
        if (self.reads_bf16 and logits.dtype == torch.bfloat16 and batch.is_greedy_fast_path
                and not batch.max_top_n):
            # exact: a bf16 score minus a float32 log_norm is computed in float32 (top tokens
            # take the float32 path: topk's order among ties need not match across dtypes)
            return _output(logits, *self.row_stats(logits), 0)
        scores = logits.float()  # [n, vocab]; the steps below never write into it in place
        if batch.banned is not None:
            scores = scores.index_put(batch.banned, torch.tensor(_NEG_INF, device=scores.device))
        if batch.grammar is not None:
            scores = _apply_grammar(scores, *batch.grammar)
        if batch.bias is not None:
            rows, ids, values = batch.bias
            scores = scores.index_put((rows, ids), values, accumulate=True)
        if batch.penalties is not None:
            scores = apply_penalties(scores, batch.penalties)
        warping = batch.warping
        if warping is None:
            token_ids, log_norm = self.row_stats(scores)  # [n], [n]
            return _output(scores, token_ids, log_norm, batch.max_top_n)
        if warping.rows is None:
            return self._sample(scores, warping, batch.max_top_n)
        # Mixed batch: greedy picks for all rows, then the sampled rows overwritten.
        out = _output(scores, *self.row_stats(scores), batch.max_top_n)
        sampled = self._sample(scores.index_select(0, warping.rows), warping, batch.max_top_n)
        out.token_ids.index_copy_(0, warping.rows, sampled.token_ids)
        out.logprobs.index_copy_(0, warping.rows, sampled.logprobs)
        if out.top_ids is not None and out.top_logprobs is not None:
            assert sampled.top_ids is not None and sampled.top_logprobs is not None
            out.top_ids.index_copy_(0, warping.rows, sampled.top_ids)
            out.top_logprobs.index_copy_(0, warping.rows, sampled.top_logprobs)
        return out

    def _sample(self, scores: torch.Tensor, warping: Warping, max_top_n: int) -> SamplerOutput:
        warped = warp(scores, warping)  # [m, vocab]
        noise = gumbel_noise(warping.seeds, warping.indices, warped.shape[1])
        token_ids = (warped + noise).argmax(dim=-1)  # [m]
        return _output(warped, token_ids, self.row_stats(warped)[1], max_top_n)


def _apply_grammar(scores: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor
                   ) -> torch.Tensor:
    """Tokens outside a row's grammar -> -inf. rows: [g]; allowed: [g, vocab] bool."""
    if rows.numel() == scores.shape[0]:  # every row has a grammar (rows are 0..n-1)
        return scores.masked_fill(~allowed, _NEG_INF)
    masked = scores.index_select(0, rows).masked_fill_(~allowed, _NEG_INF)  # [g, vocab]
    return scores.index_put((rows,), masked)


def apply_penalties(scores: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Repetition, then frequency/presence penalties. scores: [n, vocab] float32."""
    if penalties.repetition is not None and penalties.seen_mask is not None:
        penalty = penalties.repetition  # [n, 1]
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)  # [n, vocab]
        scores = torch.where(penalties.seen_mask, penalised, scores)
    if penalties.additive is not None:
        scores = scores - penalties.additive
    return scores


def warp(scores: torch.Tensor, warping: Warping) -> torch.Tensor:
    """Temperature, top_k, top_p, typical_p, min_p (HF semantics). scores: [m, vocab]."""
    if warping.temperatures is not None:
        scores = scores / warping.temperatures
    if warping.top_k_index is not None and warping.top_k_on is not None:
        top_values = scores.topk(warping.max_top_k, dim=-1).values  # [m, max_top_k]
        kth = top_values.gather(1, warping.top_k_index)  # [m, 1]
        kth = kth.masked_fill(~warping.top_k_on, _NEG_INF)
        scores = scores.masked_fill(scores < kth, _NEG_INF)
    if warping.top_p_thresholds is not None:
        scores = _top_p(scores, warping.top_p_thresholds)
    if warping.typical_masses is not None:
        scores = _typical_p(scores, warping.typical_masses)
    if warping.min_p is not None:
        probs = scores.softmax(dim=-1)  # [m, vocab]
        too_unlikely = probs < warping.min_p * probs.amax(dim=-1, keepdim=True)
        # The most likely token is never removed (min_p < 1), as HF's min_tokens_to_keep=1.
        scores = scores.masked_fill(too_unlikely, _NEG_INF)
    return scores


def _top_p(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Drop the least likely tokens whose total probability is <= 1 - top_p (HF's rule)."""
    sorted_scores, sorted_ids = scores.sort(dim=-1)  # ascending, [m, vocab]
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [m, vocab]
    remove = cumulative <= thresholds
    remove[:, -1] = False  # keep at least the most likely token
    remove = remove.scatter(1, sorted_ids, remove)
    return scores.masked_fill(remove, _NEG_INF)


def _typical_p(scores: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """Keep the tokens whose surprisal is closest to the entropy, up to `mass` (HF's rule)."""
    log_probs = scores.log_softmax(dim=-1)  # [m, vocab]
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # [m, 1]
    shifted = (-log_probs - entropy).abs()  # [m, vocab]
    sorted_shifted, sorted_ids = shifted.sort(dim=-1)  # ascending
    cumulative = scores.gather(1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)  # [m, vocab]
    last = (cumulative < masses).sum(dim=1, keepdim=True).clamp_(max=scores.shape[1] - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last)  # [m, vocab]
    remove[:, 0] = False  # keep at least the most typical token
    remove = remove.scatter(1, sorted_ids, remove)
    return scores.masked_fill(remove, _NEG_INF)


def gumbel_noise(seeds: torch.Tensor, indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[m, vocab] Gumbel(0, 1) noise: argmax(logits + noise) samples softmax(logits)."""
    u = uniform(seeds, indices, vocab_size)  # [m, vocab] in (0, 1)
    # -log(-log(u)), in place: the [m, vocab] tensor is ours and the op is memory-bound.
    return u.log_().neg_().log_().neg_()


def _output(scores: torch.Tensor, token_ids: torch.Tensor, log_norm: torch.Tensor,
            max_top_n: int) -> SamplerOutput:
    """Logprobs of `token_ids` (and the top tokens) under softmax(scores); log_norm [n] is
    logsumexp(scores). One formula, score - log_norm, for every row whatever the batch asks
    for, so a row's logprob is bit-identical alone or in any batch.
    """
    log_norm = log_norm[:, None]  # [n, 1]
    logprobs = (scores.gather(1, token_ids[:, None]) - log_norm).squeeze(1)  # [n]
    if max_top_n == 0:
        return SamplerOutput(token_ids, logprobs, None, None)
    top_scores, top_ids = scores.topk(max_top_n, dim=-1)  # [n, k], best first
    return SamplerOutput(token_ids, logprobs, top_ids, top_scores - log_norm)
