"""The default model's linears at decode and prefill sizes: our C GEMMs vs the stock kernels.

    python benchmarks/bench_cpu_gemm.py [--rows 1,8,32,64,2048] [--layers 30] [--repeats 5]
        [--quant]

One "step" is what a forward pass multiplies: every layer's q|k|v, o, gate|up and down
projections (SmolLM2-135M's shapes, random bf16 weights, a separate matrix per layer so that
the weights stream from memory as in the engine) and the LM head. For each batch of M rows it
times a step with oneDNN's packed bf16 GEMM (what the engine used before, and uses without
AVX-512 BF16) and with kernels/cpu_gemm.c, alternating, and prints ms per step, GFLOP/s and
the ratio. Also checks that both give the same result up to bf16 rounding.

`--quant`: the engine's int4 configuration instead (int4 layers with groups of 32, an int8 LM
head): torch's `_weight_int4pack_mm_for_cpu` + `_weight_int8pack_mm` against kernels/
cpu_qgemm.c on the same quantized weights; also prints the weight bytes a step reads.
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

from tokenfleet.engine.quant.int4_weight_only import Int4WeightOnlyLinear
from tokenfleet.engine.quant.int8_weight_only import Int8WeightOnlyLinear
from tokenfleet.kernels import cpu_gemm, cpu_qgemm

Run = Callable[[int, torch.Tensor], torch.Tensor]  # (matrix index, x) -> x @ w^T

# SmolLM2-135M: hidden 576, 9 heads / 3 kv heads of 64, intermediate 1,536, vocab 49,152
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
LM_HEAD = (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,64,2048")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per engine and round")
    ap.add_argument("--quant", action="store_true", help="int4 layers + int8 LM head instead")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    shapes = LAYER_SHAPES * args.layers + [LM_HEAD]
    weights = [(torch.randn(n, k, generator=g) * 0.05).bfloat16() for n, k in shapes]
    names, (stock, ours), num_bytes = (_quantized if args.quant else _bf16)(weights)
    del weights
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.layers} layers + LM head, "
          f"{num_bytes / 1e6:.0f} MB of weights ({names[1]})")
    print(f"{'rows':>5} {names[0] + ' ms':>14} {'ours ms':>9} {names[0] + ' GF/s':>16} "
          f"{'ours GF/s':>10} {'ratio':>6} {'ours GB/s':>10}")
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {k: torch.randn(m, k, generator=g).bfloat16() for k in (576, 1536)}
        for i in (0, 3, len(shapes) - 1):  # same numbers, up to bf16 rounding
            a, b = stock(i, xs[shapes[i][1]]).float(), ours(i, xs[shapes[i][1]]).float()
            assert (a - b).abs().max() <= a.abs().max() * 2.0**-5, f"results differ at {i}"
        flops = 2 * m * sum(n * k for n, k in shapes)
        repeats = max(1, args.repeats if m <= 64 else args.repeats // 3)
        times: list[list[float]] = [[], []]
        for _ in range(3):  # rounds, alternating: this VM drifts
            for j, fn in enumerate((stock, ours)):
                times[j].append(_step_s(fn, shapes, xs, repeats))
        t1, t2 = statistics.median(times[0]), statistics.median(times[1])
        print(f"{m:>5} {t1 * 1e3:>14.2f} {t2 * 1e3:>9.2f} {flops / t1 / 1e9:>16.1f} "
              f"{flops / t2 / 1e9:>10.1f} {t1 / t2:>5.2f}x {num_bytes / t2 / 1e9:>10.1f}",
              flush=True)


def _bf16(weights: list[torch.Tensor]) -> tuple[list[str], tuple[Run, Run], int]:
    gemm = cpu_gemm.load(Path(tempfile.mkdtemp()))
    if gemm is None:
        raise SystemExit("the kernel does not build here (no compiler or no AVX-512 BF16)")
    ours = [gemm.pack(w) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    sizes = [w.shape[0] for w in weights]
    return (["oneDNN", "bf16"],
            (lambda i, x: torch.ops.mkldnn._linear_pointwise(x, onednn[i], None, "none", [], ""),
             lambda i, x: gemm(x, ours[i], None, sizes[i])),
            sum(w.numel() * 2 for w in weights))


def _quantized(weights: list[torch.Tensor]) -> tuple[list[str], tuple[Run, Run], int]:
    qgemm = cpu_qgemm.load(Path(tempfile.mkdtemp()))
    if qgemm is None:
        raise SystemExit("the kernels do not build here (no compiler or no AVX-512 BF16)")
    *layers, head = weights
    stock = [Int4WeightOnlyLinear(w, None) for w in layers] + [Int8WeightOnlyLinear(head, None)]
    ours = [Int4WeightOnlyLinear(w, None, qgemm) for w in layers] + \
        [Int8WeightOnlyLinear(head, None, qgemm)]
    num_bytes = sum(b.numel() * b.element_size() for m in ours for b in m.buffers())
    return (["torch int4", "int4 + int8 head"],
            (lambda i, x: stock[i](x), lambda i, x: ours[i](x)), num_bytes)


def _step_s(fn: Run, shapes: list[tuple[int, int]], xs: dict[int, torch.Tensor],
            repeats: int) -> float:
    for i, (_, k) in enumerate(shapes):  # warm-up step
        fn(i, xs[k])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i, (_, k) in enumerate(shapes):
            fn(i, xs[k])
    return (time.perf_counter() - t0) / repeats


if __name__ == "__main__":
    main()
