"""The default model's linears at decode and prefill sizes: our C GEMM vs oneDNN, one process.

    python benchmarks/bench_cpu_gemm.py [--rows 1,8,32,64,2048] [--layers 30] [--repeats 5]

One "step" is what a forward pass multiplies: every layer's q|k|v, o, gate|up and down
projections (SmolLM2-135M's shapes, random bf16 weights, a separate matrix per layer so that
the weights stream from memory as in the engine) and the LM head. For each batch of M rows it
times a step with oneDNN's packed bf16 GEMM (what the engine used before, and uses without
AVX-512 BF16) and with kernels/cpu_gemm.c, alternating, and prints ms per step, GFLOP/s and
the ratio. Also checks that both give the same result up to bf16 rounding.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tokenfleet.kernels import cpu_gemm

# SmolLM2-135M: hidden 576, 9 heads / 3 kv heads of 64, intermediate 1,536, vocab 49,152
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
LM_HEAD = (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,64,2048")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per engine and round")
    args = ap.parse_args()
    gemm = cpu_gemm.load(Path(tempfile.mkdtemp()))
    if gemm is None:
        raise SystemExit("the kernel does not build here (no compiler or no AVX-512 BF16)")
    g = torch.Generator().manual_seed(0)
    shapes = LAYER_SHAPES * args.layers + [LM_HEAD]
    weights = [(torch.randn(n, k, generator=g) * 0.05).bfloat16() for n, k in shapes]
    ours = [gemm.pack(w) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    del weights
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.layers} layers + LM head")
    print(f"{'rows':>5} {'oneDNN ms':>10} {'ours ms':>9} {'oneDNN GF/s':>12} {'ours GF/s':>10} "
          f"{'ratio':>6}")
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in (576, 1536)}

        def run_onednn(i: int, n: int, k: int, xs: dict[int, torch.Tensor] = xs
                       ) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(xs[k], onednn[i], None, "none", [], "")

        def run_ours(i: int, n: int, k: int, xs: dict[int, torch.Tensor] = xs) -> torch.Tensor:
            return gemm(xs[k], ours[i], None, n)

        for i in (0, 3, len(shapes) - 1):  # same numbers, up to bf16 rounding
            a, b = run_onednn(i, *shapes[i]).float(), run_ours(i, *shapes[i]).float()
            assert (a - b).abs().max() <= a.abs().max() * 2.0**-6, f"results differ at {i}"
        flops = 2 * m * sum(n * k for n, k in shapes)
        repeats = max(1, args.repeats if m <= 64 else args.repeats // 3)
        times: dict[str, list[float]] = {"onednn": [], "ours": []}
        for _ in range(3):  # rounds, alternating: this VM drifts
            for name, fn in (("onednn", run_onednn), ("ours", run_ours)):
                times[name].append(_step_s(fn, shapes, repeats))
        t1, t2 = statistics.median(times["onednn"]), statistics.median(times["ours"])
        print(f"{m:>5} {t1 * 1e3:>10.2f} {t2 * 1e3:>9.2f} {flops / t1 / 1e9:>12.1f} "
              f"{flops / t2 / 1e9:>10.1f} {t1 / t2:>5.2f}x", flush=True)


def _step_s(fn: Callable[[int, int, int], torch.Tensor], shapes: list[tuple[int, int]],
            repeats: int) -> float:
    for i, (n, k) in enumerate(shapes):  # warm-up step
        fn(i, n, k)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i, (n, k) in enumerate(shapes):
            fn(i, n, k)
    return (time.perf_counter() - t0) / repeats


if __name__ == "__main__":
    main()
