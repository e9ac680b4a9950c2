"""Parts of a CPU step, each A/B against what it replaced, in one process:

    python benchmarks/bench_cpu_step_parts.py [--rows 1,32] [--prefill-prompts 16] [--rounds 4]

1. The sampler on a greedy batch of [rows, 49,152] bf16 logits (SmolLM2's vocabulary):
   argmax + logsumexp through torch's ops vs the C kernel (kernels/cpu_row_stats.c).
2. A prefill step of `--prefill-prompts` 128-token prompts (2,048 tokens by default) on
   SmolLM2 with `cpu_compile`, toggled on one engine, alternating, fresh prompts every time
   (no prefix-cache hits): (a) the element-wise ops eager vs compiled (layers/cpu_fused.py);
   (b) prefill attention in torch's SDPA vs row by row in the C kernel (attention_torch.py).
Prints ms per call and the ratios.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tokenfleet.engine import LLM, SamplingParams
from tokenfleet.engine.layers import attention_torch
from tokenfleet.engine.sampler import Sampler
from tokenfleet.engine.sampling_batch import SamplingBatch
from tokenfleet.kernels import cpu_row_stats

VOCAB = 49152


def _time(fn: object, rounds: int) -> float:
    assert callable(fn)
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds


def bench_sampler(rows: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as build_dir:
        kernel = cpu_row_stats.load(Path(build_dir))
    if kernel is None:
        raise SystemExit("no C compiler here: nothing to compare")
    logits = (torch.randn(rows, VOCAB) * 3).bfloat16()
    batch = SamplingBatch.build(
        params=[SamplingParams()] * rows, seeds=[0] * rows, indices=[0] * rows,
        token_histories=None, prompt_lens=[0] * rows, banned_token_ids=[[]] * rows,
        vocab_size=VOCAB, device=torch.device("cpu"))
    torch_s = _time(lambda: Sampler()(logits, batch), 200)
    c_s = _time(lambda: Sampler(kernel)(logits, batch), 200)
    return torch_s, c_s


def bench_prefill(llm: LLM, num_prompts: int, rounds: int, toggle: Callable[[bool], None],
                  seed: int) -> tuple[list[float], list[float]]:
    """Seconds of the prefill step with `toggle(False)` and `toggle(True)`, alternating."""
    engine = llm.engine
    gen = torch.Generator().manual_seed(seed)
    times: dict[bool, list[float]] = {False: [], True: []}
    for rnd in range(rounds + 1):  # round 0 warms up
        for on in (False, True):
            toggle(on)
            for i in range(num_prompts):
                prompt = torch.randint(100, VOCAB - 100, (128,), generator=gen).tolist()
                engine.add_request(f"{seed}-{rnd}-{on}-{i}", prompt,
                                   SamplingParams(max_new_tokens=1, ignore_eos=True))
            t0 = time.perf_counter()
            engine.step()  # the whole prefill: every prompt fits one step
            if rnd:
                times[on].append(time.perf_counter() - t0)
            while engine.has_unfinished():
                engine.step()
    return times[False], times[True]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--prefill-prompts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for rows in map(int, args.rows.split(",")):
        torch_s, c_s = bench_sampler(rows)
        print(f"sampler, greedy, {rows} x {VOCAB} bf16 logits: torch {torch_s * 1e3:.3f} ms, "
              f"C kernel {c_s * 1e3:.3f} ms ({torch_s / c_s:.2f}x)")
    llm = LLM("smollm2", dtype="bfloat16", max_num_seqs=64, cpu_compile=True,
              max_num_batched_tokens=max(2048, args.prefill_prompts * 128))
    modules = [m for m in llm.engine.runner.model.modules() if hasattr(m, "cpu_fused")]
    fused = modules[0].cpu_fused
    kernel_limit = attention_torch.KERNEL_MAX_PREFILL_CONTEXT

    def toggle_fused(on: bool) -> None:
        for m in modules:
            m.cpu_fused = fused if on else None

    def toggle_kernel(on: bool) -> None:
        attention_torch.KERNEL_MAX_PREFILL_CONTEXT = kernel_limit if on else 0

    for name, off_label, on_label, toggle, seed in (
            ("element-wise ops", "eager", "compiled", toggle_fused, 0),
            ("attention", "SDPA", "C kernel", toggle_kernel, 1)):
        off, on = bench_prefill(llm, args.prefill_prompts, args.rounds, toggle, seed)
        toggle_fused(True)
        toggle_kernel(True)
        print(f"prefill step, {args.prefill_prompts} x 128 tokens, {name}: {off_label} "
              f"{[round(t, 3) for t in off]} s, {on_label} {[round(t, 3) for t in on]} s "
              f"(median ratio {sorted(off)[len(off) // 2] / sorted(on)[len(on) // 2]:.2f}x)",
              flush=True)


if __name__ == "__main__":
    main()
